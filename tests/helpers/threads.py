"""Ranks as threads on an in-process store, counting its operations (the agreement tests)."""

from __future__ import annotations

import threading

import torch.distributed as dist


class CountingStore:
    """A store proxy counting operations per calling thread."""

    OPS = ("set", "get", "wait", "multi_get", "delete_key", "add", "check")

    def __init__(self, store=None):
        self.store = store or dist.HashStore()
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if name not in self.OPS:
            return attr

        def counted(*args, **kwargs):
            with self._lock:
                who = threading.current_thread().name
                self.counts[who] = self.counts.get(who, 0) + 1
            return attr(*args, **kwargs)

        return counted

    def clone(self):
        return self  # one in-process store: the heartbeat thread shares it


def run_ranks(world: int, body, *, names=True) -> dict[int, object]:
    """`body(rank)` on `world` threads (named rank-<r>); returns each rank's result or exception."""
    results: dict[int, object] = {}

    def target(rank):
        try:
            results[rank] = body(rank)
        except BaseException as exc:  # noqa: BLE001 - the tests assert on it
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,), name=f"rank-{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results
