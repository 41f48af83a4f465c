"""The contract every collector fulfils, whatever holds the parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["TensorInfo", "Collector", "Gather"]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What every rank knows about a state-dict entry without moving it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


class Gather(Protocol):
    def run(self, timeout: float | None) -> dict[str, torch.Tensor]: ...


class Collector(Protocol):
    """Full tensors of selected state-dict entries, on one rank.

    `infos()` lists every state-dict entry under its canonical name, in state-dict order, identically on all
    ranks and without communication. `gather(names, dst)` is called by every rank with the same `names`;
    it returns the full tensors (on their training device, dtype unchanged) on rank `dst` and `{}` on the
    others, and moves nothing but those tensors; a collective that does not finish within `timeout` seconds
    raises instead of waiting for the process group's own (often 30-minute) timeout. `slices(name)` says
    which rank holds which element range of a tensor (`None`: every rank holds it whole, read with `whole`),
    `own` the range this rank holds (a replica's too), `local` is a view of this rank's range (a load writes it).
    """

    backend: str

    def infos(self) -> dict[str, TensorInfo]: ...

    def gather(self, names: Sequence[str], dst: int, *, timeout: float | None = None) -> dict[str, torch.Tensor]: ...

    def prepare_gather(self, names: Sequence[str], dst: int, *, budget: int | None = None) -> Gather:
        """`gather` in two steps: plan and allocate now (errors here are local and agreed on), `run` later."""
        ...

    # what the per-rank shard writer reads locally, without communication
    def primary(self, name: str) -> str: ...

    def slices(self, name: str) -> list | None: ...

    def own(self, name: str): ...

    def replicated(self, name: str) -> bool: ...

    def holders(self, name: str, run) -> tuple[int, ...]:
        """The ranks holding copies of this rank's `run` of a replicated `name` (its replica group)."""
        ...

    def local(self, name: str, piece) -> torch.Tensor: ...

    def whole(self, name: str) -> torch.Tensor: ...
