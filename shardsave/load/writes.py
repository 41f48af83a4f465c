"""What a load writes where, on one rank: its own range of each tensor (or the whole tensor, where every rank holds
it whole), the fp32 master copies DeepSpeed keeps (ZeRO-1/2/3 through DeepSpeed's own setters, the stage-0 fp16/bf16
optimizers' copies found through the engine), and a ZeRO-3 parameter's full copy where it is gathered now; and the
refusals of what a write in place would not load (NVMe offload, a gather in flight). Everything here is computed
before the load's agreement (`shardsave.load.pretrained`), and applied only after it (`apply_writes`).
"""

from __future__ import annotations

import gc
import sys
import weakref
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Write", "writes_of", "zero3_writes", "zero3_unwritable", "Fp32Copies", "fp32_copies", "engine_of",
           "check_masters", "apply_writes"]  # fmt: skip


@dataclass(slots=True)
class Write:
    """One tensor range this rank writes, with the fp32 master copy DeepSpeed keeps of it, if any."""

    name: str  # canonical state-dict name (the primary of tied names)
    target: torch.Tensor  # 1-D view of this rank's elements [start, stop) of the live tensor
    value: torch.Tensor  # what goes there, already in the target's dtype
    param: nn.Parameter | None
    start: int
    master: torch.Tensor | None = None  # the fp32 values of DeepSpeed's master partition, when it has one
    master_target: torch.Tensor | None = None  # where they go when shardsave writes them itself (stage 0)


def writes_of(collector, name: str, param, files, key: str, copies: Fp32Copies) -> list[Write]:
    """This rank's writes of one tensor: its own range, or the whole tensor where every rank holds it whole; with
    the fp32 master copy DeepSpeed keeps of it."""
    if param is not None and hasattr(param, "ds_id") and hasattr(param, "ds_tensor"):
        return zero3_writes(collector, name, param, files, key)
    if collector.slices(name) is None:
        whole = collector.whole(name).detach().view(-1)
        raw = files.read(key, 0, whole.numel())
        write = Write(name, whole, raw.to(whole.dtype), param, 0)
        if param is not None and getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2, bf16 optimizer
            write.master = raw.float()
        elif param is not None and (target := copies.of(param)) is not None:  # stage 0, fp16/bf16
            write.master, write.master_target = raw.float(), target
        return [write]
    writes = []
    for run in collector.own(name):  # every run this rank holds (none: nothing to write here)
        target = collector.local(name, run).detach()
        writes.append(Write(name, target, files.read(key, run.start, run.stop).to(target.dtype), param, run.start))
    return writes


def zero3_writes(collector, name: str, param, files, key: str) -> list[Write]:
    """ZeRO-3: the rank's partition `ds_tensor` (member k of its partition group holds `[k*P, (k+1)*P)`,
    zero-padded at the end) with the optimizer's fp32 copy of it where there is an optimizer; and the full tensor
    too where the parameter is gathered now (persistent, below `stage3_param_persistence_threshold`, or inside a
    `GatheredParameters` / kept by the prefetcher). Refused first where such a write would not load it."""
    problem = zero3_unwritable(param)
    if problem is not None:
        raise RuntimeError(f"{name}: {problem}; nothing was loaded.")
    numel = int(param.ds_numel)
    start, stop = collector.partition(name)
    local = param.ds_tensor.detach().view(-1)
    raw = files.read(key, start, stop)
    master = None
    if hasattr(param, "_z3_optimizer") and param.requires_grad:  # no optimizer (evaluation): no masters
        if stop - start == local.numel():  # no padding: an fp32 read is the master itself (no second buffer)
            master = raw.float()
        else:
            master = torch.zeros(local.numel(), dtype=torch.float32)
            master[: stop - start] = raw.float()
    writes = [Write(name, local[: stop - start], raw.to(local.dtype), param, start, master)]
    if param.data.numel() == numel:  # gathered now (persistent, GatheredParameters, the prefetcher): its full copy
        whole = param.data.detach().view(-1)
        writes.append(Write(name, whole, files.read(key, 0, numel).to(whole.dtype), None, 0))
    return writes


def zero3_unwritable(param) -> str | None:
    """Why writing a ZeRO-3 parameter's partition in place would not load it, or `None` (a pure predicate over
    DeepSpeed's attributes): its partition lives on NVMe (`offload_param.device: nvme`; what memory holds is a
    placeholder or a swap buffer that is released without being written back), or its gather is in flight (the
    full copy is being filled from the old partitions)."""
    partition = param.ds_tensor
    location = getattr(partition, "final_location", None)
    if str(getattr(location, "value", location)) == "nvme":
        return (
            "its ZeRO-3 partition is offloaded to NVMe (offload_param device 'nvme'): writing the copy in memory "
            "would not reach the swap file. Load with offload_param on 'cpu' or 'none', or load before offloading"
        )
    if partition.numel() != int(getattr(partition, "ds_numel", partition.numel())):
        return (
            f"its ZeRO-3 partition holds {partition.numel()} elements, DeepSpeed expects {partition.ds_numel} "
            f"(ds_tensor.ds_numel): a placeholder (NVMe offload or a released partition)"
        )
    status = getattr(param, "ds_status", None)
    if str(getattr(status, "name", status)) == "INFLIGHT":
        return (
            "its ZeRO-3 gather is in flight (ds_status INFLIGHT): call load_pretrained outside the forward, after "
            "the prefetched gathers completed"
        )
    return None


class Fp32Copies:
    """The fp32 copies a DeepSpeed stage-0 fp16/bf16 optimizer keeps of the model's low-precision parameters
    (`FP16_Optimizer`: flat per group; `FP16_UnfusedOptimizer`: one per parameter), which nothing links to the
    parameters: found through the engine that holds the model, and only when a low-precision parameter without
    ZeRO's own mapping is loaded. Without them the next step would copy the old fp32 values back."""

    def __init__(self, model: nn.Module, root: nn.Module):
        self._model, self._root = model, root
        self._copies: dict[int, torch.Tensor] | None = None

    def of(self, param: torch.Tensor) -> torch.Tensor | None:
        if param.dtype not in (torch.float16, torch.bfloat16) or "deepspeed" not in sys.modules:
            return None
        if self._copies is None:
            engine = engine_of(self._model, self._root)
            self._copies = fp32_copies(getattr(engine, "optimizer", None)) if engine is not None else {}
        return self._copies.get(id(param))


def fp32_copies(optimizer) -> dict[int, torch.Tensor]:
    """`id(low-precision parameter) -> 1-D view of its fp32 copy` in a stage-0 optimizer (pure over its groups)."""
    groups = getattr(optimizer, "fp16_groups", None)
    if not groups:
        return {}
    out = {}
    if getattr(optimizer, "fp32_groups_flat", None) is not None:  # fused: one flat fp32 tensor per group
        for params, flat in zip(groups, optimizer.fp32_groups_flat, strict=True):
            offset = 0
            for p in params:
                out[id(p)] = flat.data.view(-1)[offset : offset + p.numel()]
                offset += p.numel()
    elif getattr(optimizer, "fp32_groups", None) is not None:  # unfused: an fp32 tensor per parameter
        for params, copies in zip(groups, optimizer.fp32_groups, strict=True):
            for p, copy in zip(params, copies, strict=True):
                out[id(p)] = copy.data.view(-1)
    return out


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_of(model: nn.Module, root: nn.Module):
    """The DeepSpeed engine wrapping `root`: `model` itself or one of its wrappers, else (the caller passed the
    engine's `module`) found back through `root` <- the engine's `_modules` <- its `__dict__` <- the engine
    (three heap scans at most, remembered per module)."""
    from deepspeed import DeepSpeedEngine

    current = model
    for _ in range(16):
        if isinstance(current, DeepSpeedEngine):
            return current
        inner = getattr(current, "_modules", {}).get("module") or getattr(current, "_modules", {}).get("_orig_mod")
        if inner is None:
            break
        current = inner
    cached = _ENGINES.get(root)
    if cached is not None and cached._modules.get("module") is root:
        return cached
    held: list = [root]
    for key in ("module", "_modules", None):  # as FSDP1's wrapper is found: one heap scan per link
        referrers = gc.get_referrers(*held)
        for engine in referrers:
            if isinstance(engine, DeepSpeedEngine) and engine._modules.get("module") is root:
                _ENGINES[root] = engine
                return engine
        ids = {id(obj) for obj in held}
        held = [r for r in referrers if key is not None and isinstance(r, dict) and id(r.get(key)) in ids]
        if not held:
            break
    return None


def check_masters(writes: list[Write]) -> None:
    """The DeepSpeed calls that write the fp32 masters exist (checked before any parameter is written)."""
    if any(w.master is not None for w in writes) and "deepspeed" not in sys.modules:
        raise RuntimeError("DeepSpeed parameters without deepspeed imported: cannot update their fp32 master weights.")


def apply_writes(writes: list[Write]) -> None:
    with torch.no_grad():
        for w in writes:
            w.target.copy_(w.value.view(-1))
            if getattr(w.param, "ds_secondary_tensor", None) is not None:
                # ZeRO++ hpZ: a copy of the partition cut for the node, which the next gather would read
                # instead of the partition just written; DeepSpeed rebuilds it from the partition after a step
                w.param.ds_secondary_tensor = None
        masters = [w for w in writes if w.master is not None]
        if masters:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

            for w in masters:
                if w.master_target is not None:
                    w.master_target.copy_(w.master.view(-1))
                elif hasattr(w.param, "ds_id"):
                    safe_set_local_fp32_param(w.param, w.master)
                else:
                    safe_set_full_fp32_param(w.param, w.master.view(w.param.shape))
