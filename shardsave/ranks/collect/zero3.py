"""DeepSpeed ZeRO-3: each parameter's `ds_tensor` is this rank's flat partition of it, over the parameter's own
partition group (`ds_process_group`), which may be smaller than the world.

DeepSpeed pads a parameter of `numel` elements to a multiple of its group's size `n` and gives the rank of
group rank `k` elements `[k*P, (k+1)*P)`, `P = ceil(numel / n)` (`ds_tensor.ds_numel`, `partition_numel()`).
When `n` is smaller than the world, every group holds the whole parameter: member `k` of each group holds the
same range, and exactly one of them sends it. Which ranks form the other groups is not recorded on this rank,
so it is derived from this rank's group, and only where that derivation cannot differ between ranks (see
`partition_groups`); anything else is refused with the setting that caused it. hpZ's secondary partition
(`ds_secondary_tensor`) is a cache of the primary one and is never read.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from shardsave.errors import UnsupportedPartitionError
from shardsave.ranks.collect.sharded import ShardedCollector, Slice

__all__ = ["Zero3Collector", "UnsupportedPartitionError", "is_zero3_param", "partition_groups", "partition_slices"]


def is_zero3_param(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_tensor")


def partition_groups(own: Sequence[int], world_size: int) -> list[tuple[int, ...]] | None:
    """All partition groups of a parameter (global ranks in group-rank order), from the group of one rank.

    Two layouts are accepted: the whole world as one group (in any order), and the strided groups
    `(j, j+R, j+2R, ...)`, `R = world_size / n`, that a data-parallel dimension outside an inner one forms
    (DeepSpeed's mesh, Megatron-style `mpu` groups). Each rank only checks its own group, so accepting a
    second tiling (e.g. consecutive blocks) would let ranks of a world tiled by both kinds at once derive
    different layouts; one kind cannot be mixed with anything but itself. `None`: not one of these."""
    own = tuple(int(r) for r in own)
    n = len(own)
    if n == 0 or world_size % n or len(set(own)) != n or not all(0 <= r < world_size for r in own):
        return None
    if n == world_size:
        return [own]
    stride = world_size // n
    if own != tuple(range(own[0], world_size, stride)):
        return None
    return [tuple(range(j, world_size, stride)) for j in range(stride)]


def partition_slices(numel: int, partition: int, groups: Sequence[Sequence[int]], shift: int = 0) -> list[Slice]:
    """Who sends which range: range `k` (`[k*partition, (k+1)*partition)` clipped to `numel`) is held by member
    `k` of every group and sent by that of group `(k + shift) % len(groups)` — the ranges of one parameter
    come from as many different groups as possible, and a per-parameter `shift` spreads parameters over the
    rest. Pure: every rank computes the same list from the same metadata."""
    size = len(groups[0])
    if any(len(g) != size for g in groups) or partition * size < numel:
        raise ValueError(f"{size} ranks with partitions of {partition} elements cannot hold {numel} elements.")
    return [
        Slice(groups[(k + shift) % len(groups)][k], min(k * partition, numel), min((k + 1) * partition, numel))
        for k in range(size)
    ]


def _split_across_groups(tensor: torch.Tensor) -> str | None:
    """The setting under which ranks outside a parameter's partition group hold other data under its name
    (so that no other group holds a copy of it), or `None` when nothing says so."""
    family = getattr(tensor, "ds_zero_placement_family", "replicated")
    if family != "replicated":
        return f"ZeRO placement family {family!r} (AutoEP experts: each expert-parallel rank holds other experts)"
    if getattr(tensor, "tensor_model_parallel", False) or getattr(tensor, "model_parallel", False):
        return "tensor_model_parallel (each tensor-parallel rank holds another shard)"
    groups = sys.modules.get("deepspeed.utils.groups")
    mpu = getattr(groups, "mpu", None)
    size = getattr(mpu, "get_model_parallel_world_size", None)
    if callable(size) and size() > 1:
        return f"an mpu with model parallel world size {size()} (model-parallel ranks hold other shards)"
    return None


class Zero3Collector(ShardedCollector):
    """Reads each parameter's partition over its own group. Persistent parameters (below
    `stage3_param_persistence_threshold`) and buffers are whole on every rank and are read in place on the
    writer."""

    backend = "zero3"

    def __init__(self, root: nn.Module, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self._register(root, lambda t: tuple(t.ds_shape) if is_zero3_param(t) else tuple(t.shape))
        self._groups: dict[int, tuple[int, ...]] = {}  # id(process group) -> its global ranks
        self._holders: dict[tuple[int, ...], tuple[int, ...]] = {}  # a partition group -> this rank's replicas

    def _partitioned(self, tensor: torch.Tensor) -> bool:
        if not is_zero3_param(tensor):
            return False
        # a persistent parameter is kept gathered on every rank
        return not (getattr(tensor, "ds_persist", False) and tensor.numel() == tensor.ds_numel)

    def _group_ranks(self, tensor: torch.Tensor) -> tuple[int, ...]:
        group = getattr(tensor, "ds_process_group", None)
        if id(group) not in self._groups:
            if group is None or not dist.is_initialized():
                self._groups[id(group)] = tuple(range(self.world_size))
            else:
                self._groups[id(group)] = tuple(dist.get_process_group_ranks(group))
        return self._groups[id(group)]

    def _slices(self, name: str) -> list[Slice] | None:
        tensor = self._tensors[name]
        if not self._partitioned(tensor):
            return None
        own = self._group_ranks(tensor)
        size, numel = len(own), int(tensor.ds_numel)
        setting = f"its partition group (ds_process_group) has global ranks {_shown(own)}"
        if self.rank not in own or getattr(tensor, "ds_zero_partition_world_size", size) != size:
            raise RuntimeError(
                f"{name}: {setting}, which does not match this rank ({self.rank}) or the parameter's "
                f"ds_zero_partition_world_size ({getattr(tensor, 'ds_zero_partition_world_size', None)}); "
                f"was the parameter re-partitioned after shardsave found it?"
            )
        partition = int(tensor.partition_numel() if callable(getattr(tensor, "partition_numel", None)) else 0)
        if partition != -(-numel // size) or int(tensor.ds_tensor.ds_numel) != partition:
            raise UnsupportedPartitionError(
                f"{name}: DeepSpeed reports partitions of {partition} elements (partition_numel()) and "
                f"{tensor.ds_tensor.ds_numel} (ds_tensor.ds_numel) for {numel} elements over {size} ranks, but "
                f"ZeRO-3 gives each rank ceil({numel}/{size}) = {-(-numel // size)}; this partitioning (MiCS or "
                f"another custom scheme) is not supported by shardsave."
            )
        if hasattr(tensor.ds_tensor, "ds_quant_scale") or tensor.ds_tensor.dtype != tensor.dtype:
            raise UnsupportedPartitionError(
                f"{name}: its ZeRO-3 partition is stored as {tensor.ds_tensor.dtype} (quantized) for a "
                f"{tensor.dtype} parameter; zero_quantized_weights / zero_quantized_nontrainable_weights are not "
                f"supported by shardsave: exclude this parameter or save without quantized weights."
            )
        # groups every rank can derive (the world, strided data-parallel groups), else only this rank's own (e.g.
        # consecutive blocks): the ranks then describe different layouts and the save puts together what each holds
        groups = partition_groups(own, self.world_size) or [own]
        split = _split_across_groups(tensor) if len(groups) > 1 else None
        if split is not None:
            raise UnsupportedPartitionError(
                f"{name}: {setting}, smaller than the world of {self.world_size}, and the other ranks do not hold "
                f"copies of it under {split}; shardsave cannot assemble it."
            )
        return partition_slices(numel, partition, groups, zlib.crc32(name.encode()))

    def replicated(self, name: str) -> bool:
        """Partition groups smaller than the world: every group holds the whole parameter."""
        return self.slices(name) is not None and len(self._group_ranks(self._tensors[name])) < self.world_size

    def partition(self, name: str, rank: int | None = None) -> tuple[int, int]:
        """Elements `[start, stop)` of `name` in `rank`'s ZeRO-3 partition (default: this rank's; a persistent
        parameter has one too): member k of any partition group holds `[k*P, (k+1)*P)`, clipped to the size."""
        tensor = self._tensors[name]
        own = self._group_ranks(tensor)
        rank = self.rank if rank is None else rank
        if rank in own:
            k = own.index(rank)
        else:
            k = next((g.index(rank) for g in partition_groups(own, self.world_size) or [] if rank in g), None)
            if k is None:
                return 0, 0
        numel = int(tensor.ds_numel)
        size = -(-numel // len(own))
        return min(k * size, numel), min((k + 1) * size, numel)

    def held_by(self, name: str, rank: int) -> list[tuple[int, int]]:
        """Member k of any group holds range k: `rank`'s index in its group (from this rank's group's layout)."""
        start, stop = self.partition(name, rank) if self.replicated(name) else (0, 0)
        return [(start, stop)] if stop > start else []

    def holders(self, name: str, run: Slice) -> tuple[int, ...]:
        """Member `k` of every partition group holds range `k`: those members, this rank's `k`."""
        own = self._group_ranks(self._tensors[name])
        if own not in self._holders:  # one per partition group, not per parameter
            k = own.index(self.rank)
            self._holders[own] = tuple(sorted(g[k] for g in partition_groups(own, self.world_size) or [own]))
        return self._holders[own]

    def own(self, name: str) -> list[Slice]:
        """Member `k` of every partition group holds range `k` (`slices` names one sender per range)."""
        start, stop = self.partition(name) if self.slices(name) is not None else (0, 0)
        return [Slice(self.rank, start, stop)] if stop > start else []

    def local(self, name: str, piece: Slice) -> torch.Tensor:
        tensor = self._tensors[name]
        partition = tensor.ds_tensor
        if partition.numel() != int(partition.ds_numel):
            raise RuntimeError(
                f"{name}: its ZeRO-3 partition holds {partition.numel()} elements, expected "
                f"{partition.ds_numel} (ds_tensor.ds_numel); NVMe-offloaded parameters are not supported."
            )
        return partition.reshape(-1)[: piece.stop - piece.start]

    def whole(self, name: str) -> torch.Tensor:
        return self._tensors[name].data


def _shown(ranks: Sequence[int], most: int = 8) -> str:
    if len(ranks) <= most:
        return str(list(ranks))
    return f"[{', '.join(map(str, ranks[:most]))}, ... ({len(ranks)} ranks)]"
