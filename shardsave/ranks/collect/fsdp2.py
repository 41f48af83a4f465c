"""FSDP2 (`fully_shard`) and any other DTensor layout: HSDP (Replicate x Shard), tensor parallelism under FSDP2
(`_StridedShard`), `Shard(d)` on any dimension, on any mesh over the job's ranks.

What each rank holds, and which replica sends each run, comes from `shardsave.plan.placements` (pure arithmetic on
the placements and the mesh). A parameter on a sub-mesh (FSDP2 over the "dp" dimension of a ("dp", "tp") mesh)
is described on the whole mesh it was cut from, replicated along the other dimensions, which is what every
rank of those dimensions holds. A mesh over some of the ranks (a pipeline stage's) is described on those ranks.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from shardsave.plan.placements import Spec, holding_of, nested_ranks, spec_of
from shardsave.ranks.collect.sharded import ShardedCollector, Slice, chunk_ranges

__all__ = ["FSDP2Collector"]


class FSDP2Collector(ShardedCollector):
    """Each rank's local tensor is a box of the global one, i.e. runs of the flattened tensor (one run for
    FSDP2's `Shard(0)`)."""

    backend = "fsdp2"

    def __init__(self, root: nn.Module, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self._register(root, lambda t: tuple(t.shape))  # a DTensor reports its global shape
        self._meshes: dict[int, tuple] = {}  # reading `mesh.mesh` costs ~0.1 ms: once per mesh
        self._runs: dict[str, dict[int, int]] = {}  # name -> start of each run this rank holds -> local offset
        self._own: dict[str, list[Slice]] = {}
        self._replicated: dict[str, object] = {}  # name -> its holding, where runs have replicas
        self._groups: dict[tuple[int, int], tuple[int, ...]] = {}  # (id(holding), rank) -> its replica group

    def _mesh(self, tensor: DTensor) -> tuple[tuple, tuple[int, ...] | None]:
        """The mesh the layout is computed on (nested tuples of global ranks) and, for a sub-mesh, which of its
        dimensions each of the tensor's mesh dimensions is."""
        mesh = tensor.device_mesh
        if id(mesh) not in self._meshes:
            root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
            where = None
            if root is not mesh and root.mesh.numel() != mesh.mesh.numel():
                names, root_names = mesh.mesh_dim_names, root.mesh_dim_names
                if not names or not root_names or any(n not in root_names for n in names):
                    raise NotImplementedError(
                        f"{mesh} is a sub-mesh of {root} without named dimensions: shardsave cannot tell which ranks "
                        f"hold the other copies. Name the mesh dimensions (init_device_mesh(mesh_dim_names=...))."
                    )
                where = tuple(root_names.index(n) for n in names)
                mesh = root
            ranks = nested_ranks(mesh.mesh.tolist())
            flat = _flat(ranks)
            if len(set(flat)) != len(flat) or not all(0 <= r < self.world_size for r in flat):
                raise NotImplementedError(
                    f"{mesh} lists ranks {flat[:8]}: not distinct ranks of the job's {self.world_size}, so shardsave "
                    f"cannot tell who holds which part of its tensors."
                )
            self._meshes[id(tensor.device_mesh)] = (ranks, where)
        return self._meshes[id(tensor.device_mesh)]

    def _slices(self, name: str) -> list[Slice] | None:
        tensor = self._tensors[name]
        if not isinstance(tensor, DTensor):
            return None
        placements = tensor.placements
        if all(isinstance(p, Replicate) for p in placements):
            return None
        if any(isinstance(p, Partial) for p in placements):
            raise NotImplementedError(
                f"{name}: DTensor placements {placements}: a Partial tensor holds unreduced sums, not values; "
                f"reduce it (redistribute to Replicate or Shard) before saving."
            )
        ranks, where = self._mesh(tensor)
        if where is None and len(placements) == 1 and placements[0] == Shard(0):  # FSDP2: one run per rank
            flat = [int(r) for r in _flat(ranks)]
            rows = tensor.shape[0] if tensor.ndim else 1
            row = tensor.numel() // rows if rows else 0
            out = [Slice(flat[i], a * row, b * row) for i, (a, b) in enumerate(chunk_ranges(rows, len(flat)))]
            mine = [s for s in out if s.rank == self.rank and s.stop > s.start]
            self._runs[name], self._own[name] = {s.start: 0 for s in mine}, mine
            return out
        specs = [_spec(name, p) for p in placements]
        if where is not None:  # on the whole mesh: replicated along the dimensions the sub-mesh leaves out
            full = [Spec("replicate")] * len(_dims(ranks))
            for j, d in enumerate(where):
                full[d] = specs[j]
            specs = full
        try:
            holding = holding_of(tuple(tensor.shape), ranks, tuple(specs))
        except ValueError as exc:
            raise NotImplementedError(f"{name}: {exc}") from None
        mine = holding.held.get(self.rank, ())
        if any(len(group) > 1 for group in holding.replicas):
            self._replicated[name] = holding
        self._runs[name] = {s.start: offset for s, offset in mine}
        self._own[name] = [s for s, _ in mine if s.stop > s.start]
        return holding.senders(zlib.crc32(name.encode()))

    def own(self, name: str) -> list[Slice]:
        return list(self._own.get(name, [])) if self.slices(name) is not None else []

    def replicated(self, name: str) -> bool:
        return self.slices(name) is not None and name in self._replicated

    def held_by(self, name: str, rank: int) -> list[tuple[int, int]]:
        holding = self._replicated.get(name) if self.slices(name) is not None else None
        return [(s.start, s.stop) for s, _ in holding.held.get(rank, ())] if holding is not None else []

    def holders(self, name: str, run: Slice) -> tuple[int, ...]:
        """The replica group (ranks with this rank's box) of a replicated `name`: the same for all its runs."""
        holding = self._replicated[name]
        key = (id(holding), self.rank)
        if key not in self._groups:  # holdings are shared by tensors of one layout: one search per layout
            self._groups[key] = next(g for g in holding.replicas if self.rank in g)
        return self._groups[key]

    def local(self, name: str, piece: Slice) -> torch.Tensor:
        data = _local_tensor(self._tensors[name]).reshape(-1)
        offset = self._runs[name][piece.start]
        if data.numel() < offset + piece.stop - piece.start:
            raise RuntimeError(
                f"{name}: this rank holds {data.numel()} elements, but its placements "
                f"{self._tensors[name].placements} say at least {offset + piece.stop - piece.start}; is the model "
                f"inside an unshard() / forward?"
            )
        return data[offset : offset + piece.stop - piece.start]

    def whole(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        return _local_tensor(tensor) if isinstance(tensor, DTensor) else tensor


def _spec(name: str, placement) -> Spec:
    spec = spec_of(placement)
    if spec is None:
        raise NotImplementedError(f"{name}: DTensor placement {placement} is not one shardsave knows how to read.")
    return spec


def _flat(ranks) -> list[int]:
    return [r for sub in ranks for r in _flat(sub)] if isinstance(ranks, tuple) else [ranks]


def _dims(ranks) -> list[int]:
    dims = []
    while isinstance(ranks, tuple):
        dims.append(len(ranks))
        ranks = ranks[0]
    return dims


def _local_tensor(tensor: DTensor) -> torch.Tensor:
    """This rank's shard, as `to_local()` gives it, without its autograd function and view (a save reads
    and detaches it: `to_local()` costs ~30x more, and a save reads a hundred shards or more)."""
    local = getattr(tensor, "_local_tensor", None)
    return local.detach() if isinstance(local, torch.Tensor) else tensor.to_local().detach()
