"""One collector per way of holding parameters; `collector_for` picks the one a model needs. Beside them: the
collector of a model whose ranks hold different parts (`staged_collector`), and that of tensors computed from
another collector's (`DerivedCollector`: `save_merged`'s merged weights)."""

from __future__ import annotations

from torch import nn

from shardsave.ranks.collect.base import Collector, TensorInfo
from shardsave.ranks.collect.derived import DerivedCollector
from shardsave.ranks.collect.local import LocalCollector
from shardsave.ranks.collect.sharded import TransferError
from shardsave.ranks.identity import Ranks

__all__ = [
    "Collector",
    "TensorInfo",
    "TransferError",
    "detect_backend",
    "collector_for",
    "describe_stage",
    "staged_collector",
    "check_readable",
    "DerivedCollector",
]


def detect_backend(root: nn.Module) -> str:
    """`"zero3"`, `"fsdp1"`, `"fsdp2"` or `"local"` (whole parameters: one process, DDP, ZeRO-1/2)."""
    from torch.distributed.tensor import DTensor

    from shardsave.ranks.collect.zero3 import is_zero3_param

    # parameters first: under ZeRO-3 and FSDP2 the first one tells (FSDP1 and local need the module walk)
    for p in root.parameters():
        if is_zero3_param(p):
            return "zero3"
        if isinstance(p, DTensor):
            return "fsdp2"
    for module in root.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            return "fsdp1"
    return "local"


def collector_for(root: nn.Module, ranks: Ranks) -> Collector:
    """The collector for `root` (the model with DDP / DeepSpeed / compile wrappers peeled off)."""
    from torch.distributed.fsdp import FSDPModule

    # FSDP1 and FSDP2 both mark the modules they manage; only FSDP1 hides the root unit in a wrapper
    if getattr(root, "_is_fsdp_managed_module", False) and not isinstance(root, FSDPModule):
        from shardsave.ranks.collect.fsdp1 import outermost_fsdp

        root = outermost_fsdp(root)
    backend = detect_backend(root)
    if backend == "fsdp1":
        from shardsave.ranks.collect.fsdp1 import FSDP1Collector

        return FSDP1Collector(root, ranks.rank, ranks.world_size)
    if backend == "fsdp2":
        from shardsave.ranks.collect.fsdp2 import FSDP2Collector

        return FSDP2Collector(root, ranks.rank, ranks.world_size)
    if backend == "zero3":
        from shardsave.ranks.collect.zero3 import Zero3Collector

        return Zero3Collector(root, ranks.rank, ranks.world_size)
    return LocalCollector(root, ranks.rank)


def describe_stage(collector: Collector, names: list[str]) -> dict[str, list]:
    """This rank's part of `names` for a model whose ranks hold different parts (see `shardsave.plan.stages`)."""
    from shardsave.ranks.collect.staged import describe

    return describe(collector, names)


def staged_collector(inner: Collector, union: dict, ranks: Ranks) -> Collector:
    """The collector that gathers the tensors of `union` (`shardsave.plan.stages.union_views`), reading this rank's
    part through `inner`."""
    from shardsave.ranks.collect.staged import StagedCollector

    return StagedCollector(inner, union["tensors"], union["runs"], ranks.rank, ranks.world_size)


def check_readable(collector: Collector, names: list[str], rank: int) -> None:
    """Read (as views) this rank's part of every tensor of `names`, so that a state in which it cannot be read
    (inside FSDP1's `summon_full_params`, ZeRO-3 NVMe offload) fails while planning, on every rank alike, rather than
    in the middle of the gather."""
    for name in dict.fromkeys(collector.primary(n) for n in names):
        pieces = collector.slices(name)
        if pieces is None:
            collector.whole(name)
        for piece in pieces or ():
            if piece.rank == rank and piece.stop > piece.start:
                collector.local(name, piece)
