"""Parameters that are whole on every rank: one process, DDP, DeepSpeed ZeRO-1/2. Nothing to gather."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shardsave.plan.names import canonical_name
from shardsave.ranks.collect.base import TensorInfo

__all__ = ["LocalCollector"]


class LocalCollector:
    """Reads the writer's own copy; other ranks contribute nothing and wait."""

    backend = "local"

    def __init__(self, root: nn.Module, rank: int):
        self._rank = rank
        self._tensors = {canonical_name(k): v for k, v in root.state_dict(keep_vars=True).items()}

    def infos(self) -> dict[str, TensorInfo]:
        return {
            k: TensorInfo(tuple(v.shape), v.dtype, bool(getattr(v, "requires_grad", False)))
            for k, v in self._tensors.items()
        }

    def primary(self, name: str) -> str:
        return name

    def slices(self, name: str) -> None:
        return None  # whole on every rank

    def own(self, name: str) -> list:
        return []

    def replicated(self, name: str) -> bool:
        return False

    def whole(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def prepare_gather(self, names: Sequence[str], dst: int, *, budget: int | None = None) -> _Read:
        return _Read({n: self._tensors[n].detach() for n in names} if self._rank == dst else {})

    def gather(self, names: Sequence[str], dst: int, *, timeout: float | None = None) -> dict[str, torch.Tensor]:
        return self.prepare_gather(names, dst).run(timeout)


class _Read:
    """The writer's own tensors, as they are (live: callers that hand them out copy them)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def run(self, timeout: float | None) -> dict[str, torch.Tensor]:
        return self.tensors
