"""A collector of tensors computed from another collector's, run by run, where their sources are held.

`save_merged` gathers the merged weights this way: each saved key has a source in the live model's collector, is
held exactly where that source is (the same runs, replicas and holders), and is gathered like any sharded tensor
(`prepare_gather`), the values being computed from this rank's run of the source when they are read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from shardsave.plan.ranges import Slice
from shardsave.ranks.collect.base import Collector, TensorInfo
from shardsave.ranks.collect.sharded import ShardedCollector

__all__ = ["DerivedCollector", "Compute"]

#: `compute(key, run, start)`: elements `[start, start + run.numel())` of `key`, from the same elements of its source.
Compute = Callable[[str, torch.Tensor, int], torch.Tensor]


class DerivedCollector(ShardedCollector):
    """`infos`: each key's shape and dtype; `sources`: the name in `inner` each key is computed from; `compute`: as
    `Compute` says. A run read twice in a row (split over rounds of a gather) is computed once."""

    backend = "derived"

    def __init__(
        self,
        inner: Collector,
        infos: Mapping[str, TensorInfo],
        sources: Mapping[str, str],
        compute: Compute,
        rank: int,
        world_size: int,
    ):
        super().__init__(rank, world_size)
        self.inner = inner
        self._infos.update(infos)
        self._sources = dict(sources)
        self._compute = compute
        self._last: tuple[str, int, torch.Tensor] | None = None

    def _source(self, key: str) -> str:
        return self.inner.primary(self._sources[key])

    def _slices(self, key: str) -> list[Slice] | None:
        return self.inner.slices(self._source(key))

    def replicated(self, key: str) -> bool:
        return self.inner.replicated(self._source(key))

    def held_by(self, key: str, rank: int) -> list[tuple[int, int]]:
        return self.inner.held_by(self._source(key), rank)

    def own(self, key: str) -> list[Slice]:
        return self.inner.own(self._source(key))

    def local(self, key: str, piece: Slice) -> torch.Tensor:
        if self._last is not None and self._last[:2] == (key, piece.start):
            return self._last[2]  # a run split over rounds: computed once
        run = self.inner.local(self._source(key), piece).detach()
        out = self._compute(key, run, piece.start)
        self._last = (key, piece.start, out)
        return out

    def whole(self, key: str) -> torch.Tensor:
        live = self.inner.whole(self._source(key)).detach().reshape(-1)
        out = self._compute(key, live, 0)
        # never the live storage: a writer hands it to numpy, which would pin it (FSDP frees it by resizing)
        return out.clone() if out.untyped_storage().data_ptr() == live.untyped_storage().data_ptr() else out
