"""A model whose ranks hold different parts of it (pipeline stages): the collector that gathers from the plan
`shardsave.plan.stages.union_views` made of what every rank reported, reading each rank's part through the
collector of its own backend (plain modules, DDP, FSDP1, FSDP2 inside a stage)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from shardsave.plan.ranges import Slice
from shardsave.plan.stages import sender_of
from shardsave.ranks.collect.base import TensorInfo
from shardsave.ranks.collect.sharded import ShardedCollector
from shardsave.ranks.replicas import fingerprints

__all__ = ["describe", "StagedCollector"]


def _held(collector, name: str) -> list[tuple[int, int, torch.Tensor]]:
    """`(start, stop, data)` of every run of `name` this rank holds, through its own backend's collector."""
    if collector.slices(name) is None:
        data = collector.whole(name).detach().reshape(-1)
        return [(0, data.numel(), data)]
    return [(run.start, run.stop, collector.local(name, run)) for run in collector.own(name)]


def describe(collector, names: Sequence[str]) -> dict[str, list]:
    """This rank's part of the tensors `names` (those it has): `{name: [shape, dtype, requires_grad, [[start,
    stop, fingerprint], ...]]}` under primary names, the `tensors` of a `shardsave.plan.stages` view. Fingerprints
    let rank 0 check that ranks holding copies of a run hold the same bytes."""
    infos = collector.infos()
    primaries = list(dict.fromkeys(collector.primary(n) for n in names))
    runs = {name: _held(collector, name) for name in primaries}
    prints = fingerprints({f"{n}@{start}": data for n, held in runs.items() for start, _, data in held})
    return {
        name: [
            list(infos[name].shape),
            str(infos[name].dtype).removeprefix("torch."),
            bool(infos[name].requires_grad),
            [[start, stop, prints[f"{name}@{start}"]] for start, stop, _ in runs[name]],
        ]
        for name in primaries
    }


class StagedCollector(ShardedCollector):
    """Gathers the tensors of a staged plan: `runs` (name -> `[start, stop, [ranks holding a copy]]`) says who
    holds what; `inner` (this rank's own backend collector) reads this rank's runs. Every tensor is sharded
    here (a tensor one stage holds whole is one run of its ranks), so nothing is read as "whole on every rank"."""

    backend = "staged"

    def __init__(self, inner, tensors: Mapping[str, list], runs: Mapping[str, list], rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.inner = inner
        self.inner_backend = inner.backend
        for name, (shape, dtype, requires_grad) in tensors.items():
            self._infos[name] = TensorInfo(tuple(shape), getattr(torch, dtype), requires_grad)
        self._copies = {name: [(int(a), int(b), tuple(holders)) for a, b, holders in r] for name, r in runs.items()}

    def _slices(self, name: str) -> list[Slice]:
        return [Slice(sender_of(name, holders), a, b) for a, b, holders in self._copies[name]]

    def own(self, name: str) -> list[Slice]:
        return [Slice(self.rank, a, b) for a, b, holders in self._copies.get(name, ()) if self.rank in holders]

    def replicated(self, name: str) -> bool:
        return any(len(holders) > 1 for _, _, holders in self._copies.get(name, ()))

    def held_by(self, name: str, rank: int) -> list[tuple[int, int]]:
        return [(a, b) for a, b, holders in self._copies.get(name, ()) if rank in holders]

    def holders(self, name: str, run: Slice) -> tuple[int, ...]:
        return next(tuple(h) for a, b, h in self._copies[name] if (a, b) == (run.start, run.stop))

    def local(self, name: str, piece: Slice) -> torch.Tensor:
        for start, stop, data in _held(self.inner, name):
            if start <= piece.start and piece.stop <= stop:
                return data[piece.start - start : piece.stop - start]
        raise RuntimeError(f"{name}: elements [{piece.start}, {piece.stop}) are not held by rank {self.rank}.")

    def whole(self, name: str) -> torch.Tensor:
        return self.inner.whole(name)
