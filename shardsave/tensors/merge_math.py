"""PEFT's merge arithmetic (`merge_and_unload`, PEFT 0.21) for one base tensor, or any flat element range of it.

Pure functions: no I/O, no collectives, so the offline merge (`shardsave.merged.offline`) and the in-training
merge of sharded weights (`shardsave.merged.live`) share them. The plan they carry out (which base tensor each
adapter tensor changes, and how: `Step`) is `shardsave.plan.merge_steps`'s. `merge_tensor` makes the same
operations, dtype promotions and order as PEFT (`get_delta_weight`, `Linear.merge` / `Embedding.merge`, the DoRA
variant's `merge_unsafe`, `TrainableTokensLayer.merge`, the `modules_to_save` copy), so the result is bit-equal to
`merge_and_unload()` given the adapter tensors in the dtype PEFT holds them at merge time (`merge_dtype`). On a
range, every operation is elementwise per base element except DoRA's weight norm, which needs whole rows: the
caller passes it (`weight_norms`) unless the range covers whole rows. Where results are not bit-equal, the
docstrings say so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from shardsave.errors import MergeRefused
from shardsave.plan.merge_steps import Step

__all__ = ["merge_dtype", "lora_delta", "dora_weight_norm", "merge_tensor"]


def merge_dtype(role: str, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype PEFT's `PeftModel.from_pretrained` (autocast_adapter_dtype=True) holds an adapter tensor of `role`
    in when it merges: LoRA factors, magnitudes and LoRA biases in float32; copies and token deltas in the base
    tensor's dtype (they are cast to it). An in-training merge uses the live tensors as they are instead."""
    return torch.float32 if role in ("A", "B", "magnitude", "bias") and base_dtype.is_floating_point else base_dtype


def _tensor(step: Step, tensors: Mapping[tuple[str, str], torch.Tensor], role: str) -> torch.Tensor:
    try:
        return tensors[step.adapter, step.tensors[role]]
    except KeyError:
        raise ValueError(f"adapter {step.adapter!r}: {step.tensors[role]} was not given to the merge") from None


def _rows(shape: Sequence[int], start: int, stop: int) -> tuple[int, int, int]:
    """The whole rows (first index of a 2-D tensor) the flat range touches, and its offset in the first one."""
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    first = start // cols if cols else 0
    last = -(-stop // cols) if cols else 0
    return first, last, start - first * cols


def lora_delta(
    step: Step, tensors: Mapping[tuple[str, str], torch.Tensor], rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """PEFT's `get_delta_weight` for a "lora" or "embedding" step, in the base weight's layout, for its rows
    `rows` (all by default): `transpose(B @ A, fan_in_fan_out) * scaling` (a Linear) or `(B @ A).T * scaling`
    (an Embedding); bf16/fp16 factors on the CPU are multiplied in float32 and the result cast back, as PEFT
    does. Rows are computed from the factors' matching rows (or columns): the same dot products as the full
    product, which CPU BLAS reduces in the same order (checked in the tests), not guaranteed by every BLAS."""
    a, b = _tensor(step, tensors, "A"), _tensor(step, tensors, "B")
    reference = a if step.kind == "embedding" else b  # whose dtype PEFT checks
    cast = b.device.type == "cpu" and reference.dtype in (torch.float16, torch.bfloat16)
    if cast:
        a, b = a.float(), b.float()
    transposed = step.kind == "embedding" or step.fan_in_fan_out
    if rows is not None:  # rows of the stored weight: columns of B @ A when it is stored transposed
        if transposed:
            a = a[:, rows[0] : rows[1]]
        else:
            b = b[rows[0] : rows[1]]
    product = b @ a
    product.mul_(step.scaling)  # in place: the same bits as `* scaling`, one buffer of the weight's size fewer
    out = product.T if transposed else product
    return out.to(reference.dtype) if cast else out


def dora_weight_norm(step: Step, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DoRA's weight norm (`DoraLinearLayer.get_weight_norm` as `merge` calls it, scaling 1): the L2 norm of each
    output feature of `base + delta`, for whole rows of the stored weight (whole columns when
    `fan_in_fan_out`). `base` is the weight without any adapter merged, `delta` from `lora_delta` for the same
    rows. Bit-equal to PEFT's when given whole rows; a caller that holds partial rows can instead pass
    `sqrt(sum of its parts' squared sums)` to `merge_tensor`, within a few ulp of it."""
    w = base.T if step.fan_in_fan_out else base
    d = delta.T if step.fan_in_fan_out else delta
    summed = w + 1 * d
    return torch.linalg.norm(summed, dim=1).to(summed.dtype)


def merge_tensor(
    base: torch.Tensor,
    shape: Sequence[int],
    steps: Sequence[Step],
    tensors: Mapping[tuple[str, str], torch.Tensor],
    *,
    start: int = 0,
    weight_norms: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The merged value of elements `[start, start + base.numel())` of the flattened base tensor of `shape`.

    `base`: those elements (any shape holding them; the whole tensor when `start == 0` and it has `shape`), in
    the dtype the merged model has (it may be changed in place). `steps`: `plan_merge(...)[key]`. `tensors`:
    (adapter name, saved adapter key) -> full tensor, for every key the steps name, in PEFT's merge-time dtype
    (`merge_dtype`).
    `weight_norms`: adapter name -> DoRA weight norm of all output features (`dora_weight_norm` over whole
    rows), needed for a DoRA step when the range does not cover whole rows (whole tensor with
    `fan_in_fan_out`). Returns the merged elements, shaped as `base`.

    Bit-equal to PEFT's `merge_and_unload()` for every step, except a DoRA step that follows another adapter's
    change of the same tensor: PEFT unmerges and re-merges the earlier adapters to get the base for the norm
    (rounding each time), this computes it from the unchanged base: within a few ulp.
    """
    shape = tuple(shape)
    numel = base.numel()
    stop = start + numel
    if not 0 <= start <= stop <= math.prod(shape):
        raise ValueError(f"elements [{start}, {stop}) are outside a tensor of shape {list(shape)}")
    if not steps:
        return base
    whole = start == 0 and numel == math.prod(shape)
    first, last, offset = _rows(shape, start, stop)
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    if whole:
        window = base.reshape(shape) if len(shape) > 1 else base.reshape(-1)
    else:  # the whole rows around the range; elements outside it are never read back
        rows = (last - first, cols) if len(shape) > 1 else (last - first,)
        window = torch.zeros(rows, dtype=base.dtype, device=base.device)
        window.view(-1)[offset : offset + numel] = base.reshape(-1)
    aligned = offset == 0 and numel == (last - first) * cols
    original = window.clone() if any(s.dora for s in steps) and len(steps) > 1 else window
    for step in steps:
        window = _apply(step, window, original, tensors, shape, (first, last), whole, aligned, weight_norms)
    flat = window.reshape(-1) if whole else window.reshape(-1)[offset : offset + numel]
    return flat.reshape(base.shape)


def _apply(step, window, original, tensors, shape, rows, whole, aligned, weight_norms) -> torch.Tensor:
    sliced = None if whole else rows
    if step.kind == "replace":
        value = _tensor(step, tensors, "value")
        if tuple(value.shape) != shape:
            raise MergeRefused(f"{step.tensors['value']}: {list(value.shape)}, the base tensor is {list(shape)}.")
        value = value.reshape(shape[0], -1) if len(shape) > 1 else value.reshape(-1)
        return value[rows[0] : rows[1]].to(window.dtype).reshape(window.shape).clone()
    if step.kind == "bias":
        window += _tensor(step, tensors, "bias")[rows[0] : rows[1]] * step.scaling
        return window
    if step.kind == "tokens":
        delta = _tensor(step, tensors, "delta")
        for i, token in enumerate(step.token_indices):
            if rows[0] <= token < rows[1]:
                window[token - rows[0]] = delta[i].to(window)
        return window
    if len(shape) != 2:
        raise MergeRefused(
            f"{step.module}: LoRA on a {len(shape)}-D weight (a convolution?) is not merged by shardsave."
        )
    delta = lora_delta(step, tensors, sliced)
    if step.kind == "embedding":
        window += delta.to(window.dtype)
        return window
    if not step.dora:
        window += delta
        return window
    norms = None if weight_norms is None else weight_norms.get(step.adapter)
    if norms is None:
        if not whole and (step.fan_in_fan_out or not aligned):
            raise ValueError(
                f"{step.module}: DoRA needs the weight norm of whole rows; pass weight_norms[{step.adapter!r}]."
            )
        norms = dora_weight_norm(step, original, delta)
    elif not step.fan_in_fan_out:
        norms = norms[rows[0] : rows[1]]
    magnitude = _tensor(step, tensors, "magnitude")
    if not step.fan_in_fan_out:
        magnitude = magnitude[rows[0] : rows[1]]
    factor = (magnitude / norms).view(-1, 1)
    if step.fan_in_fan_out:
        factor = factor.T
    return (factor * (window + delta)).to(window.dtype)
