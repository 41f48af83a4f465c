"""FSDP2 (`fully_shard`): parameters are DTensors sharded on dim 0 over a 1-D mesh."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from .sharded import ShardedCollector, Slice, chunk_ranges

__all__ = ["FSDP2Collector"]


class FSDP2Collector(ShardedCollector):
    """Each rank's `to_local()` is a run of whole rows, i.e. one contiguous range of the flattened tensor."""

    backend = "fsdp2"

    def __init__(self, root: nn.Module, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self._register(root, lambda t: tuple(t.shape))  # a DTensor reports its global shape
        self._meshes: dict[int, list[int] | None] = {}  # reading `mesh.mesh` costs ~0.1 ms: once per mesh

    def _mesh_ranks(self, tensor: DTensor) -> list[int] | None:
        mesh = tensor.device_mesh
        if id(mesh) not in self._meshes:
            ranks = [int(r) for r in mesh.mesh.flatten().tolist()] if mesh.ndim == 1 else None
            self._meshes[id(mesh)] = ranks if ranks and sorted(ranks) == list(range(self.world_size)) else None
        return self._meshes[id(mesh)]

    def _slices(self, name: str) -> list[Slice] | None:
        tensor = self._tensors[name]
        if not isinstance(tensor, DTensor):
            return None
        placements = tensor.placements
        if all(isinstance(p, Replicate) for p in placements):
            return None
        ranks = self._mesh_ranks(tensor)
        if ranks is None or placements != (Shard(0),):
            raise NotImplementedError(
                f"{name}: DTensor placements {placements} on mesh {tensor.device_mesh} are not supported by "
                f"shardsave's FSDP2 collector (it handles Shard(0) or Replicate on a 1-D mesh over all ranks)."
            )
        rows = tensor.shape[0] if tensor.ndim else 1
        row = tensor.numel() // rows if rows else 0
        return [
            Slice(ranks[i], start * row, stop * row) for i, (start, stop) in enumerate(chunk_ranges(rows, len(ranks)))
        ]

    def local(self, name: str, piece: Slice) -> torch.Tensor:
        data = _local_tensor(self._tensors[name]).reshape(-1)
        if data.numel() < piece.stop - piece.start:
            raise RuntimeError(
                f"{name}: this rank holds {data.numel()} elements but FSDP2's dim-0 sharding says "
                f"{piece.stop - piece.start}; is the model inside an unshard() / forward?"
            )
        return data[: piece.stop - piece.start]

    def whole(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        return _local_tensor(tensor) if isinstance(tensor, DTensor) else tensor


def _local_tensor(tensor: DTensor) -> torch.Tensor:
    """This rank's shard, as `to_local()` gives it, without its autograd function and view (a save reads
    and detaches it: `to_local()` costs ~30x more, and a save reads a hundred shards or more)."""
    local = getattr(tensor, "_local_tensor", None)
    return local.detach() if isinstance(local, torch.Tensor) else tensor.to_local().detach()
