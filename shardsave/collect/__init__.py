"""One collector per way of holding parameters; `collector_for` picks the one a model needs."""

from __future__ import annotations

from torch import nn

from ..ranks import Ranks
from .base import Collector, TensorInfo
from .local import LocalCollector

__all__ = ["Collector", "TensorInfo", "LocalCollector", "detect_backend", "collector_for"]


def detect_backend(root: nn.Module) -> str:
    """`"zero3"`, `"fsdp1"`, `"fsdp2"` or `"local"` (whole parameters: one process, DDP, ZeRO-1/2)."""
    from torch.distributed.tensor import DTensor

    for module in root.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            return "fsdp1"
    for p in root.parameters():
        if hasattr(p, "ds_id") and hasattr(p, "ds_tensor"):
            return "zero3"
        if isinstance(p, DTensor):
            return "fsdp2"
    return "local"


def collector_for(root: nn.Module, ranks: Ranks) -> Collector:
    backend = detect_backend(root)
    if backend == "local":
        return LocalCollector(root, ranks.rank)
    raise NotImplementedError(
        f"shardsave cannot yet collect parameters sharded by {backend}; only whole parameters (one process, "
        f"DDP, DeepSpeed ZeRO-1/2) are supported in this version."
    )
