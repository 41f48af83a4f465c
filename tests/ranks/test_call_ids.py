"""Call ids handed out by rank 0 (ranks as threads on an in-process store): a call only some ranks made, a rank
that comes too late, a rank 0 that runs ahead through a call that does not wait, calls of different ops, and a
decision that fails with any error; after each, the next calls of all ranks agree again, in O(N) store
operations."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist
from threads import CountingStore, run_ranks

from shardsave.errors import MissingRanksError, RemoteError, SaveError
from shardsave.ranks.identity import Ranks
from shardsave.ranks.rendezvous import Rendezvous

CountingStore.OPS = (*CountingStore.OPS, "compare_set")


def rdv(store, rank, world=2, *, op="save", timeout=0.3, generation=None) -> Rendezvous:
    return Rendezvous(Ranks(rank, world), op=op, timeout=timeout, store=store, generation=generation)


def save(store, rank, world=2, *, timeout=10.0, tag="x"):
    """What save_pretrained does on the store: agree on the start (the same arguments), the writer posts."""
    r = rdv(store, rank, world, timeout=timeout)

    def decide(statuses):
        if len({s["tag"] for s in statuses.values()}) > 1:
            raise ValueError("ranks disagree")
        return {"n": len(statuses)}

    verdict = r.agree("start", {"tag": tag}, decide=decide)
    r.forget_previous()
    if rank == 0:
        with r.heartbeat():
            r.post("done", {"ok": True})
    else:
        r.wait_for("done", 0, heartbeat=True)
    return verdict


def alone(store, who, rank, world=2):
    """`who` alone calls a save (timeout 0.3 s) and catches its error."""
    if rank != who:
        return None
    try:
        save(store, rank, world, timeout=0.3)
    except MissingRanksError as exc:
        return exc
    return "passed"


@pytest.mark.parametrize("who", [0, 1])
def test_after_a_call_one_rank_made_alone_the_next_calls_agree(who):
    store = dist.HashStore()
    world = 3

    def body(rank):
        error = alone(store, who, rank, world)
        time.sleep(1.5)  # the lone rank has given up
        return error, save(store, rank, world), save(store, rank, world)

    results = run_ranks(world, body)
    error = results[who][0]
    assert isinstance(error, MissingRanksError), results
    assert error.missing == ((1, 2) if who == 0 else (0,))
    for rank in range(world):
        assert results[rank][1:] == ({"n": world}, {"n": world}), results


def test_several_lone_calls_of_rank_zero_are_skipped_by_the_others():
    store = dist.HashStore()

    def body(rank):
        for _ in range(3):
            alone(store, 0, rank)
        time.sleep(1.5 * rank)  # rank 1 calls once rank 0 has given up three times
        return save(store, rank)

    assert run_ranks(2, body) == {0: {"n": 2}, 1: {"n": 2}}


def test_a_late_rank_fails_when_rank_zero_starts_no_other_call_then_all_agree_again():
    store = dist.HashStore()

    def body(rank):
        if rank == 1:
            time.sleep(0.8)  # after rank 0's timeout of 0.3 s
        started = time.monotonic()
        try:
            save(store, rank, timeout=0.3)
        except MissingRanksError as exc:
            error = (exc, time.monotonic() - started)
        time.sleep(1.0 if rank == 0 else 0.0)
        return error, save(store, rank)

    results = run_ranks(2, body)
    (late, waited), again = results[1]
    assert late.missing == (0,) and "Rank 0 had given up on this rank in an earlier call" in str(late)
    assert waited < 2  # one timeout for rank 0's next call, not longer
    assert results[0][0][0].missing == (1,)
    assert again == results[0][1] == {"n": 2}


def test_a_late_rank_joins_rank_zeros_retry_of_the_same_save():
    store = dist.HashStore()

    def body(rank):
        if rank == 1:
            time.sleep(0.8)
            return save(store, rank)
        try:
            save(store, rank, timeout=0.3)
        except MissingRanksError:
            return save(store, rank)  # caught, and retried at once: rank 1 joins this one

    assert run_ranks(2, body) == {0: {"n": 2}, 1: {"n": 2}}


def test_a_late_rank_joining_a_different_save_is_refused_on_both():
    store = dist.HashStore()

    def body(rank):
        if rank == 1:
            time.sleep(0.8)
            return save(store, rank, tag="step-100")
        try:
            save(store, rank, timeout=0.3, tag="step-100")
        except MissingRanksError:
            return save(store, rank, tag="step-200")

    results = run_ranks(2, body)
    assert all(isinstance(r, ValueError) and "ranks disagree" in str(r) for r in results.values()), results


def test_rank_zero_running_ahead_through_a_call_that_does_not_wait():
    """ShardSaveCallback's pattern: rank 0 posts the checkpoint folder and goes on to the save, where it waits."""
    store = dist.HashStore()

    def body(rank):
        for _ in range(2):
            r = rdv(store, rank, op="callback", timeout=5)
            if rank == 0:
                r.post("checkpoint", {"path": "run/checkpoint-3"})
            else:
                time.sleep(0.5)  # far behind rank 0
                assert r.wait_for("checkpoint", 0, heartbeat=True) == {"path": "run/checkpoint-3"}
            r.forget_later()
            save(store, rank)
        return "ok"

    assert run_ranks(2, body) == {0: "ok", 1: "ok"}
    # the callback's keys go with the save after it: the calls and used-id counters, a heartbeat, the last save's
    # open, claim, status, verdict and done
    assert store.num_keys() == 8, store.list_keys()


def test_calls_of_different_ops_fail_at_once_on_both_and_the_next_agree():
    store = dist.HashStore()

    def body(rank):
        started = time.monotonic()
        try:
            r = rdv(store, rank, op="load" if rank == 0 else "save", timeout=10)
            time.sleep(0.2 * rank)  # rank 0 opens first
            r.agree("load" if rank == 0 else "start", {})
        except SaveError as exc:
            error = (exc, time.monotonic() - started)
        return error, save(store, rank)

    results = run_ranks(2, body)
    (zero, t0), (one, t1) = results[0][0], results[1][0]
    assert isinstance(zero, RemoteError) and zero.rank == 1 and "met shardsave.load on rank 0" in str(zero)
    assert type(one) is SaveError and "shardsave.save on rank 1 met shardsave.load on rank 0" in str(one)
    assert max(t0, t1) < 5  # not the timeout of 10 s
    assert results[0][1] == results[1][1] == {"n": 2}


@pytest.mark.parametrize("error", [KeyError("writer"), RuntimeError("out of memory"), TypeError("bad status")])
def test_any_error_of_rank_zeros_decision_reaches_every_rank_at_once(error):
    store = dist.HashStore()
    world = 3

    def decide(statuses):
        raise error

    def body(rank):
        started = time.monotonic()
        r = rdv(store, rank, world, timeout=10, generation=0)  # a fixed id: the same test runs on the old protocol
        try:
            r.agree("start", {}, decide=decide)
        except Exception as exc:
            return exc, time.monotonic() - started

    results = run_ranks(world, body)
    assert results[0][0] is error
    for rank in (1, 2):
        exc, waited = results[rank]
        assert isinstance(exc, RemoteError) and exc.rank == 0, exc
        assert f"{type(error).__name__}: {error}" in str(exc)
        assert waited < 5  # rank 0's timeout is 10 s: no rank waited it out


def test_store_operations_with_call_ids_stay_linear_and_keys_bounded():
    store = CountingStore()
    world, saves = 64, 3

    def body(rank):
        return [save(store, rank, world) for _ in range(saves)]

    results = run_ranks(world, body)
    assert all(r == [{"n": world}] * saves for r in results.values()), results
    per_rank = [store.counts.get(f"rank-{r}", 0) for r in range(1, world)]
    assert max(per_rank) <= saves * 14  # O(1) per rank and save: 5 to join, set, wait, get, wait, get, deletes
    assert store.counts["rank-0"] <= saves * (2 * world + 12)
    # left: one call counter, one used-id counter and one heartbeat per rank, the last save's posts
    assert store.store.num_keys() <= 3 * world + 6


# -- real ranks (2 gloo processes) ------------------------------------------------------------------------------


@pytest.mark.multirank
def test_saves_after_lone_calls_and_a_failed_decision_succeed_on_gloo(tmp_path):
    """The issue's reproduction: rank 0 alone calls save_pretrained(timeout=5) and catches the error; then rank 1
    alone; then rank 0's start decision raises a RuntimeError. Every later save of both ranks succeeds, equal to
    PEFT's save, and each failure reached every rank within its timeout."""
    from multirank import check_ok
    from multirank import run_ranks as run_processes
    from peft import PeftModel
    from tiny import assert_same_files, base_model

    timeout = 5
    results = run_processes("calls_recover", tmp_path, timeout=timeout, limit=300)
    check_ok(results)
    zero, one = (r.result["steps"] for r in results)
    assert zero["alone0"]["type"] == "MissingRanksError" and "rank(s) [1] of 2" in zero["alone0"]["error"]
    assert one["alone1"]["type"] == "MissingRanksError" and "rank(s) [0] of 2" in one["alone1"]["error"]
    assert zero["alone0"]["elapsed"] < timeout + 10 and one["alone1"]["elapsed"] < timeout + 10
    assert zero["decide"]["type"] == "RuntimeError" and "rank 0's decision failed" in zero["decide"]["error"]
    assert one["decide"]["type"] == "RemoteError"
    assert "failed on rank 0 (this is rank 1): RuntimeError: rank 0's decision failed" in one["decide"]["error"]
    assert one["decide"]["elapsed"] < 3 * timeout  # not rank 0's timeout and the margin: posted at once
    for steps in (zero, one):
        assert steps["save1"]["ok"] and steps["save2"]["ok"], steps
    model = PeftModel.from_pretrained(base_model(), str(tmp_path / "theirs"))
    for n in (1, 2):
        assert_same_files(tmp_path / f"ours{n}", tmp_path / "theirs", model)


@pytest.mark.multirank
def test_callback_waits_for_a_late_rank_zero_with_a_heartbeat_and_not_for_an_absent_one(tmp_path):
    """Rank 0 reaches ShardSaveCallback.on_save 3 x timeout after rank 1 (deleting old checkpoints alone): the
    save succeeds. Then rank 1 alone calls on_save: MissingRanksError after about one timeout."""
    from multirank import check_ok
    from multirank import run_ranks as run_processes
    from peft import PeftModel
    from tiny import assert_same_files, base_model

    timeout = 3
    results = run_processes("callback_rank0_late", tmp_path, timeout=timeout, limit=300)
    check_ok(results)
    zero, one = (r.result["steps"] for r in results)
    assert zero["late"]["ok"] and one["late"]["ok"], (zero, one)
    assert one["late"]["elapsed"] > 2 * timeout  # it waited well past its timeout (rank 0 came 3 x timeout late)
    never = one["never"]
    assert never["type"] == "MissingRanksError" and "rank(s) [0] of 2" in never["error"]
    assert never["elapsed"] < 2 * timeout + 5
    checkpoint = tmp_path / "run" / "checkpoint-3"
    ours = tmp_path / "ours"
    ours.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        (ours / name).write_bytes((checkpoint / name).read_bytes())
    assert_same_files(ours, tmp_path / "theirs", PeftModel.from_pretrained(base_model(), str(tmp_path / "theirs")))
