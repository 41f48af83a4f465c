"""The writer's heartbeat: while one rank works on something the others wait for (writing the adapter), a thread
bumps its counter in the store, so that `Rendezvous.wait_for` can tell a slow writer from a dead or stuck one.
"""

from __future__ import annotations

import threading

import torch.distributed as dist

__all__ = ["Heartbeat", "beat_key", "read_beat", "patience"]


def beat_key(rank: int) -> str:
    return f"shardsave/beat/{rank}"


class Heartbeat:
    """A thread that bumps a counter in the store while the writer writes, on its own store client, so that
    the others can tell a slow writer from a dead or stuck one. Used as a context manager."""

    def __init__(self, store, key: str, timeout: float):
        self.key = key
        self.interval = max(min(timeout / 4, 30.0), 0.05)
        self._store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self._store is not None:
            self._thread = threading.Thread(target=self._run, name="shardsave-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        client = None  # connected at the first beat: a save shorter than the interval costs no connection
        while not self._stop.wait(self.interval):
            try:
                if client is None:
                    clone = getattr(self._store, "clone", None)
                    client = clone() if clone is not None else self._store
                client.add(self.key, 1)
            except (RuntimeError, dist.DistError):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def patience(timeout: float) -> float:
    """How long the others wait for a writer whose heartbeat goes on: 12 x timeout, at least an hour."""
    return max(12 * timeout, 3600.0)


def read_beat(store, key: str) -> int | None:
    try:
        return int(store.add(key, 0))
    except (RuntimeError, dist.DistError):
        return None
