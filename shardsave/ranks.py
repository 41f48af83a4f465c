"""Who this process is, and how all ranks agree before and after a save without ever hanging.

Agreement goes through the process group's key-value store, not through collectives: every rank posts
its status under a per-call key, then waits for the others' keys with a timeout. A rank that never calls
the save shows up as a missing key, which names it; a rank that failed posts its error, which every other
rank re-raises. Tensor collectives only start once all ranks have said they are ready.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT", "Ranks", "Rendezvous", "SaveError", "MissingRanksError", "RemoteError"]

#: Seconds a rank waits for the others at each step of a save before it gives up.
DEFAULT_TIMEOUT = 300.0

_generation = itertools.count()


class SaveError(RuntimeError):
    """A distributed save could not complete; raised on every rank that took part."""


class MissingRanksError(SaveError):
    """Some ranks did not reach the save in time (typically: only rank 0 called it)."""

    def __init__(self, message: str, missing: tuple[int, ...]):
        super().__init__(message)
        self.missing = missing


class RemoteError(SaveError):
    """Another rank failed; its error is carried in the message."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True, slots=True)
class Ranks:
    """This process's place in the default process group (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_timeout(timeout: float | None) -> float:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    return float(timeout)


class Rendezvous:
    """Per-call agreement among all ranks through the default store.

    Every rank must create one per save call, in the same order: the key namespace is a per-process call
    counter, so a rank that skipped a call is seen as missing.
    """

    def __init__(self, ranks: Ranks, *, op: str, timeout: float):
        self.ranks = ranks
        self.op = op
        self.timeout = timeout
        generation = next(_generation)
        self._store = None
        if ranks.distributed:
            self._store = dist.distributed_c10d._get_default_store()
        self._prefix = f"shardsave/{generation}/"

    def _key(self, phase: str, rank: int) -> str:
        return f"{self._prefix}{phase}/{rank}"

    def post(self, phase: str, payload: dict) -> None:
        if self._store is not None:
            try:
                self._store.set(self._key(phase, self.ranks.rank), json.dumps(payload))
            except (RuntimeError, dist.DistError) as exc:
                raise self._store_lost(phase, exc) from exc

    def _store_lost(self, phase: str, exc: BaseException) -> SaveError:
        return SaveError(
            f"shardsave.{self.op}: lost the process group's key-value store at the {phase!r} step (this is rank "
            f"{self.ranks.rank}): {exc}. The store lives in rank 0's process under a plain launch (MASTER_ADDR / "
            f"MASTER_PORT) and in the launcher under torchrun: its process has probably died, so the job cannot "
            f"finish the save."
        )

    def collect(self, phase: str, ranks: Iterable[int]) -> dict[int, dict]:
        """Wait for `phase` posts from `ranks`; raise `MissingRanksError` naming the absent ones."""
        ranks = list(ranks)
        if self._store is None:
            raise AssertionError("collect() needs a process group")
        keys = [self._key(phase, r) for r in ranks]
        try:
            self._store.wait(keys, timedelta(seconds=self.timeout))
        except (RuntimeError, dist.DistError) as exc:
            present = {r: self._check(k) for r, k in zip(ranks, keys, strict=True)}
            if None in present.values():
                raise self._store_lost(phase, exc) from exc
            missing = tuple(r for r, here in present.items() if not here)
            if not missing:
                raise
            raise MissingRanksError(
                f"shardsave.{self.op}: rank(s) {list(missing)} of {self.ranks.world_size} did not reach "
                f"the {phase!r} step within {self.timeout:g} s (this is rank {self.ranks.rank}). Every rank "
                f"must call shardsave.{self.op}(...), not only the main process: pass is_main_process to "
                f"choose the writer, and timeout= to wait longer.",
                missing,
            ) from exc
        try:
            return {r: json.loads(self._store.get(k)) for r, k in zip(ranks, keys, strict=True)}
        except (RuntimeError, dist.DistError) as exc:
            raise self._store_lost(phase, exc) from exc

    def _check(self, key: str) -> bool | None:
        """Whether `key` is posted; None when the store cannot be reached."""
        try:
            return bool(self._store.check([key]))
        except (RuntimeError, dist.DistError):
            return None

    def agree(self, phase: str, payload: dict) -> dict[int, dict]:
        """Post `payload` and return every rank's, by rank."""
        if self._store is None:
            return {self.ranks.rank: payload}
        self.post(phase, payload)
        return self.collect(phase, range(self.ranks.world_size))


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
