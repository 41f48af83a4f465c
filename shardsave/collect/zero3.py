"""DeepSpeed ZeRO-3: each parameter's `ds_tensor` is this rank's flat partition of it."""

from __future__ import annotations

import torch
from torch import nn

from .sharded import ShardedCollector, Slice

__all__ = ["Zero3Collector", "is_zero3_param"]


def is_zero3_param(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_tensor")


class Zero3Collector(ShardedCollector):
    """Rank r holds elements `[r*P, (r+1)*P)` of the flattened parameter, `P = ceil(numel / world)` (the
    last partition padded). Persistent parameters (below `stage3_param_persistence_threshold`) and buffers
    are whole on every rank and are read in place on the writer."""

    backend = "zero3"

    def __init__(self, root: nn.Module, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self._register(root, lambda t: tuple(t.ds_shape) if is_zero3_param(t) else tuple(t.shape))

    def _partitioned(self, tensor: torch.Tensor) -> bool:
        if not is_zero3_param(tensor):
            return False
        # a persistent parameter is kept gathered on every rank
        return not (getattr(tensor, "ds_persist", False) and tensor.numel() == tensor.ds_numel)

    def slices(self, name: str) -> list[Slice] | None:
        tensor = self._tensors[name]
        if not self._partitioned(tensor):
            return None
        numel = int(tensor.ds_numel)
        part = -(-numel // self.world_size)
        return [Slice(r, min(r * part, numel), min((r + 1) * part, numel)) for r in range(self.world_size)]

    def local(self, name: str, piece: Slice) -> torch.Tensor:
        partition = self._tensors[name].ds_tensor
        if partition.numel() < piece.stop - piece.start:
            raise RuntimeError(
                f"{name}: ZeRO-3 partition holds {partition.numel()} elements, expected at least "
                f"{piece.stop - piece.start}; NVMe-offloaded parameters are not supported."
            )
        return partition.reshape(-1)[: piece.stop - piece.start]

    def whole(self, name: str) -> torch.Tensor:
        return self._tensors[name].data
