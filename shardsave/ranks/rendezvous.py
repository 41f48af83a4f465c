"""How all ranks agree before and after a shardsave call without ever hanging (who they are: `identity`; the
writer's sign of life: `heartbeat`).

Agreement goes through the process group's key-value store, not through collectives: every rank posts
its status under a per-call key, rank 0 gathers them and posts one verdict that every rank reads. A rank
that never calls the save shows up as a missing key, which names it; a rank that failed posts its error,
which every other rank re-raises. Tensor traffic only starts once the verdict says every rank is ready.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from shardsave.errors import MissingRanksError, RemoteError, SaveError
from shardsave.ranks.heartbeat import Heartbeat, beat_key, patience, read_beat
from shardsave.ranks.identity import Ranks

__all__ = [
    "Rendezvous",
    "SaveError",
    "MissingRanksError",
    "RemoteError",
    "status_of",
    "raise_on_failure",
    "check_same_args",
]


class Rendezvous:
    """One call's agreement among all ranks through the process group's store, in O(N) store operations.

    Every rank creates one per shardsave call. The call's id, which names its keys, comes from rank 0, so that
    a call only some ranks made (rank 0 alone under `if rank == 0:`, the error caught) does not shift the
    calls after it. At the call's first step (`agree`, `post` or `wait_for`):

    1. rank 0 opens call k = `add("shardsave/calls", 1)` and posts `shardsave/<k>/open` (its op);
    2. rank r > 0 takes the next id n it has not used (`shardsave/next/<r>` counts those), waits `timeout` for
       `shardsave/<n>/open`, then claims it: `compare_set("shardsave/<n>/claim/<r>", "", "joined")`, and counts
       n as used. The claim reads "revoked" where rank 0 gave up on r in call n (step 3): that call ended
       without r, so r takes n + 1 and repeats. A rank that gives up waiting for rank 0 to open uses no id,
       so its next call waits for the same one. An open call of another op is an error on r and on rank 0
       (the ranks' calls differ);
    3. `agree`: every rank posts its status under the call's keys; rank 0 alone waits for all of them (one
       wait, one multi-get), decides and posts one verdict; the others wait for the verdict only (O(1) each).
       For each rank missing at its deadline rank 0 revokes the claim (`compare_set(..., "", "revoked")`):
       a rank that had claimed already reads the verdict that names it missing and raises, instead of
       joining a gather nobody else is in; one that had not skips the call when it arrives. Every failure
       while deciding is posted as the verdict: no rank waits out a timeout for a rank 0 that failed.

    So rank r's calls map onto rank 0's in order, skipping those rank 0 gave up on without r: a rank that came
    too late joins rank 0's next call if it starts within `timeout` (its arguments checked as any call's), or
    raises `MissingRanksError`. `post` / `wait_for` carry one rank's outcome to the others (the writer's).
    Keys a rank set are deleted by it at its next call's agreement, once every rank has provably moved on; a
    revoked claim by the rank it was meant for, when it sees it. `generation` fixes the id (simulated ranks).
    """

    def __init__(self, ranks: Ranks, *, op: str, timeout: float, store=None, generation: int | None = None):
        self.ranks = ranks
        self.op = op
        self.timeout = timeout
        self._store = store
        if self._store is None and ranks.distributed:
            self._store = dist.distributed_c10d._get_default_store()
        self._prefix: str | None = None if generation is None else f"shardsave/{generation}/"
        self._claims = generation is None  # ids handed out by rank 0, with claims to revoke
        self._skipped: int | None = None  # a call rank 0 gave up on without this rank, seen while joining
        self._mine: list[str] = []  # keys this rank set in this call

    def _key(self, phase: str, rank: int | str) -> str:
        return f"{self._prefix}{phase}/{rank}"

    def _call(self, phase: str, method: str, *args):
        """A store operation; the store being unreachable raises `SaveError`."""
        try:
            return getattr(self._store, method)(*args)
        except (RuntimeError, dist.DistError) as exc:
            raise self._store_lost(phase, exc) from exc

    def _enter(self, phase: str, *, heartbeat: bool = False) -> None:
        """Open (rank 0) or join (the others) this call at its first step: see steps 1-2 of the class docstring.
        `heartbeat`: wait for rank 0 to open as long as its heartbeat goes on (`wait_for`)."""
        if self._prefix is not None or self._store is None:
            return
        if self.ranks.rank == 0:
            self._prefix = f"shardsave/{int(self._call(phase, 'add', _CALLS, 1))}/"
            self._set(self._prefix + "open", {"op": self.op, "phase": phase}, phase)
            return
        used = f"shardsave/next/{self.ranks.rank}"
        call = int(self._call(phase, "add", used, 0)) + 1
        while True:
            opened = f"shardsave/{call}/open"
            self._wait_alive(opened, 0, phase, heartbeat=heartbeat)
            claim = f"shardsave/{call}/claim/{self.ranks.rank}"
            taken = self._call(phase, "compare_set", claim, "", _JOINED)
            self._call(phase, "add", used, 1)
            if _text(taken) == _JOINED:
                break
            self._skipped = call  # rank 0 gave up on this rank in that call: it is over
            self._call(phase, "delete_key", claim)
            call += 1
        self._prefix = f"shardsave/{call}/"
        self._mine.append(claim)
        opener = self._get(opened, phase)
        theirs = opener["op"]
        if theirs != self.op:
            error = SaveError(
                f"shardsave.{self.op} on rank {self.ranks.rank} met shardsave.{theirs} on rank 0: the ranks' "
                f"shardsave calls differ (one was called on some ranks only, or in another order). Every rank must "
                f"make the same shardsave calls in the same order."
            )
            self._set(self._key(opener["phase"], self.ranks.rank), status_of(error), phase)  # rank 0 learns it now
            raise error

    def _revoke(self, missing: tuple[int, ...], phase: str) -> None:
        """Rank 0, giving up on `missing`: a rank that has not claimed this call yet will skip it."""
        if not self._claims:
            return
        for rank in missing:
            self._call(phase, "compare_set", self._key("claim", rank), "", _REVOKED)

    def _set(self, key: str, payload: dict, phase: str) -> None:
        try:
            self._store.set(key, json.dumps(payload))
        except (RuntimeError, dist.DistError) as exc:
            raise self._store_lost(phase, exc) from exc
        self._mine.append(key)

    def _store_lost(self, phase: str, exc: BaseException) -> SaveError:
        return SaveError(
            f"shardsave.{self.op}: lost the process group's key-value store at the {phase!r} step (this is rank "
            f"{self.ranks.rank}): {exc}. The store lives in rank 0's process under a plain launch (MASTER_ADDR / "
            f"MASTER_PORT) and in the launcher under torchrun: its process has probably died, so the job cannot "
            f"finish the save."
        )

    def _missing_error(self, phase: str, missing: tuple[int, ...]) -> MissingRanksError:
        late = self.ranks.rank in missing
        skipped = ""
        if self._skipped is not None and 0 in missing:
            skipped = (
                " Rank 0 had given up on this rank in an earlier call (this rank came after rank 0's timeout, or "
                "rank 0 made a shardsave call this rank did not make), and has started no other since."
            )
        return MissingRanksError(
            f"shardsave.{self.op}: rank(s) {list(missing)} of {self.ranks.world_size} did not reach the {phase!r} "
            f"step within {self.timeout:g} s (this is rank {self.ranks.rank}"
            + (", which arrived after the others gave up" if late else "")
            + f").{skipped} Every rank must call shardsave.{self.op}(...), not only the main process: pass "
            f"is_main_process to choose the writer, and timeout= to wait longer.",
            missing,
        )

    def _wait(self, keys: list[str], seconds: float, phase: str) -> bool:
        """Wait for `keys`; False on timeout. The store being unreachable raises `SaveError`."""
        try:
            self._store.wait(keys, timedelta(seconds=seconds))
            return True
        except (RuntimeError, dist.DistError) as exc:
            present = [self._check(k) for k in keys]
            if None in present:
                raise self._store_lost(phase, exc) from exc
            if all(present):
                return True
            return False

    def _check(self, key: str) -> bool | None:
        """Whether `key` is posted; None when the store cannot be reached."""
        try:
            return bool(self._store.check([key]))
        except (RuntimeError, dist.DistError):
            return None

    def _get(self, key: str, phase: str) -> dict:
        try:
            return json.loads(self._store.get(key))
        except (RuntimeError, dist.DistError) as exc:
            raise self._store_lost(phase, exc) from exc

    def agree(
        self,
        phase: str,
        payload: dict,
        *,
        own: BaseException | None = None,
        decide: Callable[[dict[int, dict]], object] | None = None,
    ) -> object:
        """Every rank posts `payload` (with `own`, its error, if any); rank 0 runs `decide(statuses by rank)`
        once every status is in and no rank failed; its result (JSON-able) is returned on every rank. Raises
        on every rank: `own`; else `RemoteError` for another rank's error, `MissingRanksError` for absent
        ranks, or the `ValueError` / `SaveError` that `decide` raised."""
        status = status_of(own, **payload)
        if self._store is None:
            raise_on_failure({self.ranks.rank: status}, own=own, ranks=self.ranks, op=self.op)
            return decide({self.ranks.rank: status}) if decide else None
        self._enter(phase)
        verdict_key = self._key(phase, "verdict")
        if self.ranks.rank == 0:
            verdict, refused = self._decide(phase, status, decide)
            self._set(verdict_key, verdict, phase)
            if refused is not None and own is None:
                raise refused  # rank 0's own decision: its own exception, with its traceback
        else:
            self._set(self._key(phase, self.ranks.rank), status, phase)
            # rank 0 waits `timeout` for everyone, then posts: give it that long and a margin
            if not self._wait([verdict_key], self.timeout + max(5.0, 0.1 * self.timeout), phase):
                raise self._missing_error(phase, (0,))
            verdict = self._get(verdict_key, phase)
        if own is not None:
            raise own
        return _raise_verdict(verdict, self, phase)

    def _decide(self, phase: str, own_status: dict, decide) -> tuple[dict, Exception | None]:
        others = range(1, self.ranks.world_size)
        keys = [self._key(phase, r) for r in others]
        if not self._wait(keys, self.timeout, phase):
            missing = tuple(r for r, k in zip(others, keys, strict=True) if not self._check(k))
            self._revoke(missing, phase)
            return {"ok": False, "kind": "missing", "missing": list(missing)}, None
        try:
            statuses = {0: own_status}
            values = self._store.multi_get(keys)  # each rank deletes its own status at its next call
            statuses.update({r: json.loads(v) for r, v in zip(others, values, strict=True)})
        except (RuntimeError, dist.DistError) as exc:
            raise self._store_lost(phase, exc) from exc
        for rank, status in sorted(statuses.items()):
            if not status.get("ok", False):
                return {"ok": False, "kind": "remote", "rank": rank, "message": status.get("error")}, None
        if decide is None:
            return {"ok": True, "result": None}, None
        try:
            return {"ok": True, "result": decide(statuses)}, None
        except ValueError as exc:  # the ranks' inputs disagree: the same ValueError on every rank
            return {"ok": False, "kind": "invalid", "message": str(exc)}, exc
        except Exception as exc:  # rank 0 failed while deciding, whatever the error: RemoteError on the others
            return {"ok": False, "kind": "remote", "rank": 0, "message": f"{type(exc).__name__}: {exc}"}, exc

    def post(self, phase: str, payload: dict) -> None:
        """This rank's outcome of `phase`, for `wait_for` on the others."""
        if self._store is not None:
            self._enter(phase)
            self._set(self._key(phase, self.ranks.rank), payload, phase)

    def wait_for(self, phase: str, rank: int, *, heartbeat: bool = False) -> dict:
        """`rank`'s post for `phase`. Without `heartbeat`, within `timeout`; with it, as long as `rank` shows
        signs of life (its `heartbeat()` advances at least once per `timeout`), up to `patience(timeout)`
        seconds: a slow but working writer is waited for, a dead or stuck one is not. The same holds for
        rank 0 opening the call where this is the call's first step (it may arrive late: `ShardSaveCallback`)."""
        self._enter(phase, heartbeat=heartbeat)
        key = self._key(phase, rank)
        self._wait_alive(key, rank, phase, heartbeat=heartbeat)
        return self._get(key, phase)

    def _wait_alive(self, key: str, rank: int, phase: str, *, heartbeat: bool) -> None:
        """Wait for `key`, posted by `rank`, as `wait_for` says; raise if it does not come."""
        beat = beat_key(rank)
        started = time.monotonic()
        last = read_beat(self._store, beat) if heartbeat else None
        while not self._wait([key], self.timeout, phase):
            if not heartbeat:
                raise self._missing_error(phase, (rank,))
            seen = read_beat(self._store, beat)
            if seen is None or seen == last:  # no beat for a whole timeout: dead or stuck
                error = self._missing_error(phase, (rank,))
                error.args = (f"{error.args[0]} Its heartbeat stopped: it has probably died or hangs (check its log).",)
                raise error
            waited = time.monotonic() - started
            if waited >= patience(self.timeout):
                raise SaveError(
                    f"shardsave.{self.op}: rank {rank} is alive but has not finished the {phase!r} step in "
                    f"{waited:.0f} s (this is rank {self.ranks.rank}; the limit is 12 x timeout, at least 1 h). Its "
                    f"filesystem may hang; its half-written output, if any, is never published."
                )
            last = seen

    def heartbeat(self) -> Heartbeat:
        """A heartbeat this rank keeps while it works on something the others wait for (`wait_for`). Its counter
        (one per rank, kept across calls) is not tied to a call: it may run before this call's first step."""
        return Heartbeat(self._store, beat_key(self.ranks.rank), self.timeout)

    def release(self, phase: str) -> None:
        """Delete what the agreement on `phase` left in the store as soon as it is read, for agreements whose
        payloads are large: this rank's own status now (rank 0 read it before it posted the verdict this rank
        has read), and the verdict once every rank has read it (the last reader deletes it). Called by every rank
        right after `agree(phase, ...)` returned; what a failure leaves is deleted at the next call as usual."""
        if self._store is None:
            return
        count = self._key(phase, "read")
        self._mine.append(count)
        try:
            if self.ranks.rank != 0:
                self._store.delete_key(self._key(phase, self.ranks.rank))
            if self._store.add(count, 1) == self.ranks.world_size:
                self._store.delete_key(self._key(phase, "verdict"))
                self._store.delete_key(count)
        except (RuntimeError, dist.DistError):
            pass  # the store is gone: the next step reports it

    def forget_previous(self) -> None:
        """Delete the keys this rank set in its previous call. Safe once this call's first agreement is
        done: every rank has then left the previous call."""
        if self._store is not None and self._prefix is not None:
            for key in _previous_keys.get(self.ranks.rank, ()):
                if key.startswith(self._prefix):  # a call numbered like this one (another store): not ours to drop
                    continue
                try:
                    self._store.delete_key(key)
                except (RuntimeError, dist.DistError):
                    break
        _previous_keys[self.ranks.rank] = self._mine

    def forget_later(self) -> None:
        """For a call without an agreement of its own (rank 0 posts, the others read): its keys are deleted with
        the previous call's, at the next call's first agreement. A call that failed keeps its keys: a rank that
        missed it still has to find it open, and skip it."""
        if self._store is not None and self._prefix is not None:
            _previous_keys.setdefault(self.ranks.rank, []).extend(self._mine)


_previous_keys: dict[int, list[str]] = {}  # by rank: one entry per process, or per simulated rank
_CALLS = "shardsave/calls"  # rank 0's count of the calls it opened: the last call's id
_JOINED, _REVOKED = "joined", "revoked"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _raise_verdict(verdict: dict, rdv: Rendezvous, phase: str) -> object:
    if verdict.get("ok"):
        return verdict.get("result")
    kind = verdict.get("kind")
    if kind == "missing":
        raise rdv._missing_error(phase, tuple(verdict["missing"]))
    if kind == "remote":
        rank = verdict["rank"]
        raise RemoteError(
            f"shardsave.{rdv.op} failed on rank {rank} (this is rank {rdv.ranks.rank}): {verdict.get('message')}",
            rank,
        )
    if kind == "invalid":
        raise ValueError(verdict["message"])
    raise SaveError(verdict.get("message", f"shardsave.{rdv.op}: the {phase!r} step failed"))


def status_of(exc: BaseException | None, **extra) -> dict:
    """A JSON-able status: ok, or the error's type and message."""
    if exc is None:
        return {"ok": True, **extra}
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}", **extra}


def raise_on_failure(statuses: dict[int, dict], *, own: BaseException | None, ranks: Ranks, op: str) -> None:
    """Re-raise this rank's own error, or the first other rank's as `RemoteError`."""
    if own is not None:
        raise own
    for rank, status in sorted(statuses.items()):
        if not status.get("ok", False):
            raise RemoteError(
                f"shardsave.{op} failed on rank {rank} (this is rank {ranks.rank}): {status.get('error')}",
                rank,
            )


def check_same_args(statuses: dict[int, dict], *, op: str, plan_means: str) -> None:
    """Rank 0's check that every rank called `op` with the same arguments (`status["args"]`); the `plan` digest
    stands for `plan_means` (its value says nothing to a user). Raises `ValueError`, which every rank re-raises."""
    reference = statuses[0]["args"]
    for rank, status in sorted(statuses.items()):
        for key, value in status["args"].items():
            if value != reference.get(key):
                what = plan_means if key == "plan" else f"{key}={value!r}"
                theirs = "another" if key == "plan" else repr(reference.get(key))
                raise ValueError(
                    f"Ranks disagree on the {op}: rank {rank} has {what} but rank 0 has {theirs}. Every rank must "
                    f"make the {op} call with the same arguments on the same model."
                )
