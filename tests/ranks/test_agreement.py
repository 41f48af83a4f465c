"""The store agreement, with ranks as threads on an in-process store: O(N) store operations, a late rank
fails instead of passing on stale posts, keys are deleted, and a slow writer with a heartbeat is waited for
while a silent one is not."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from threads import CountingStore, run_ranks

from shardsave.errors import MissingRanksError, RemoteError, SaveError
from shardsave.ranks.identity import Ranks
from shardsave.ranks.rendezvous import Rendezvous


def one_save(store, world: int, generation: int, *, timeout=30.0):
    """What save_pretrained does on the store: agree on the start, then the writer posts its outcome."""

    def body(rank):
        rdv = Rendezvous(Ranks(rank, world), op="test", timeout=timeout, store=store, generation=generation)
        verdict = rdv.agree("start", {"main": rank == 0}, decide=lambda statuses: {"writer": 0, "n": len(statuses)})
        rdv.forget_previous()
        if rank == 0:
            with rdv.heartbeat():
                rdv.post("done", {"ok": True})
        else:
            rdv.wait_for("done", 0, heartbeat=True)
        return verdict

    return body


@pytest.mark.parametrize("world", [4, 64, 256])
def test_store_operations_grow_linearly_and_keys_are_deleted(world):
    store = CountingStore()
    for generation in range(3):  # the second and third saves delete what the previous one left
        results = run_ranks(world, one_save(store, world, generation))
        assert all(r == {"writer": 0, "n": world} for r in results.values()), results
    per_rank = [store.counts.get(f"rank-{r}", 0) for r in range(1, world)]
    assert max(per_rank) <= 3 * 8  # O(1) per rank and save: set, wait, get, (done) wait, get, add, deletes
    assert sum(store.counts.values()) <= 3 * 10 * world  # O(N) in all (the old design: N^2 gets per save)
    # what is left: at most the last save's verdict and posts, never a growing pile
    assert store.store.num_keys() <= world + 4


def test_store_operations_of_rank_zero_are_linear():
    store = CountingStore()
    world = 128
    run_ranks(world, one_save(store, world, 0))
    assert store.counts["rank-0"] <= 2 * world + 10


def test_a_late_rank_reads_the_verdict_and_fails_instead_of_passing():
    """Rank 1 arrives after rank 0 gave up on it: it must not pass on rank 0's post and enter a gather alone."""
    store = dist.HashStore()
    world = 2

    def body(rank):
        if rank == 1:
            time.sleep(1.5)
        rdv = Rendezvous(Ranks(rank, world), op="test", timeout=0.5, store=store, generation=0)
        return rdv.agree("start", {"x": 1}, decide=lambda s: "go")

    results = run_ranks(world, body)
    assert isinstance(results[0], MissingRanksError) and results[0].missing == (1,)
    assert isinstance(results[1], MissingRanksError) and results[1].missing == (1,)
    assert "arrived after the others gave up" in str(results[1])


def test_errors_reach_every_rank():
    store = dist.HashStore()

    def own_error(rank):
        rdv = Rendezvous(Ranks(rank, 3), op="test", timeout=10, store=store, generation=1)
        return rdv.agree("start", {}, own=KeyError("boom") if rank == 2 else None)

    results = run_ranks(3, own_error)
    assert isinstance(results[2], KeyError)
    assert all(isinstance(results[r], RemoteError) and results[r].rank == 2 for r in (0, 1))

    def refused(rank):
        rdv = Rendezvous(Ranks(rank, 3), op="test", timeout=10, store=store, generation=2)

        def decide(statuses):
            raise ValueError("ranks disagree")

        return rdv.agree("start", {}, decide=decide)

    results = run_ranks(3, refused)
    assert all(isinstance(r, ValueError) and "ranks disagree" in str(r) for r in results.values())


def test_rank_zero_missing_is_named():
    store = dist.HashStore()

    def body(rank):
        if rank == 0:
            return None
        rdv = Rendezvous(Ranks(rank, 2), op="test", timeout=0.3, store=store, generation=0)
        return rdv.agree("start", {})

    results = run_ranks(2, body)
    assert isinstance(results[1], MissingRanksError) and results[1].missing == (0,)


def test_slow_writer_with_a_heartbeat_is_waited_for_and_a_silent_one_is_not():
    store = dist.HashStore()
    timeout = 0.4

    def slow(rank):
        rdv = Rendezvous(Ranks(rank, 2), op="test", timeout=timeout, store=store, generation=0)
        if rank == 0:
            with rdv.heartbeat():
                time.sleep(5 * timeout)  # a slow filesystem: much longer than the timeout
            rdv.post("done", {"ok": True})
            return "wrote"
        return rdv.wait_for("done", 0, heartbeat=True)

    results = run_ranks(2, slow)
    assert results == {0: "wrote", 1: {"ok": True}}

    def silent(rank):
        rdv = Rendezvous(Ranks(rank, 2), op="test", timeout=timeout, store=store, generation=1)
        if rank == 0:
            time.sleep(6 * timeout)  # stuck, no heartbeat
            return "stuck"
        started = time.monotonic()
        try:
            rdv.wait_for("done", 0, heartbeat=True)
        except MissingRanksError as exc:
            return exc, time.monotonic() - started

    results = run_ranks(2, silent)
    error, waited = results[1]
    assert "heartbeat stopped" in str(error) and waited < 3 * timeout


def test_a_lost_store_is_a_save_error():
    class Broken:
        def set(self, *a):
            raise dist.DistError("connection reset")

    rdv = Rendezvous(Ranks(1, 2), op="test", timeout=1, store=Broken(), generation=0)
    with pytest.raises(SaveError, match="lost the process group's key-value store"):
        rdv.agree("start", {})


def test_wait_uses_the_timeout():
    store = dist.HashStore()
    rdv = Rendezvous(Ranks(1, 2), op="test", timeout=0.2, store=store, generation=0)
    started = time.monotonic()
    with pytest.raises(MissingRanksError):
        rdv.wait_for("run", 0)
    assert time.monotonic() - started < 2
    assert timedelta(seconds=rdv.timeout) == timedelta(seconds=0.2)
