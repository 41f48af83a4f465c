"""PiSSA / CorDA / OLoRA -> plain LoRA, on the device where the gathered tensors are.

An adapter trained from such an initialisation (base weight W = W_res + s·B0·A0) becomes a LoRA adapter for
the original W: s·B'·A' = s·(B·A - B0·A0) with A' = [A; A0] (rows) and B' = [B, -B0] (columns), and the
rank and alpha doubled so that the scale s stays the same.

Differences from PEFT, on purpose (PEFT's result is wrong or unloadable in these cases):
- every other tensor (`modules_to_save`, trainable tokens, biases, saved embeddings) is kept, not dropped;
- embedding LoRA (`lora_embedding_A` / `lora_embedding_B`) is converted too;
- DoRA, `lora_bias` and rsLoRA with rank/alpha patterns cannot be converted exactly and are refused;
- the adapter's dtype is kept (PEFT promotes bf16 to fp32);
- the initial adapter is only read: its config is not rewritten and nothing is loaded into the live model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "kind_of",
    "check_convertible",
    "convert_config_dict",
    "check_initial",
    "converted_shape",
    "convert_tensor",
    "segment",
]

_A_SUFFIXES = ("lora_A.weight", "lora_embedding_A")
_B_SUFFIXES = ("lora_B.weight", "lora_embedding_B")


def kind_of(key: str) -> str:
    """`"A"` (stack rows with A0), `"B"` (append -B0 columns) or `"keep"`."""
    if key.endswith(_A_SUFFIXES):
        return "A"
    if key.endswith(_B_SUFFIXES):
        return "B"
    return "keep"


def check_convertible(adapter_name: str, config) -> None:
    """Refuse configurations whose conversion would not reproduce the trained model exactly.
    `config` is a LoraConfig or its serialised dict."""

    def get(field: str):
        return config.get(field) if isinstance(config, Mapping) else getattr(config, field, None)

    reasons = []
    if get("use_dora"):
        reasons.append("DoRA magnitudes are relative to the mutated base weight")
    if get("lora_bias"):
        reasons.append("lora_bias adds a bias that the initial adapter also changed")
    if get("use_rslora") and (get("rank_pattern") or get("alpha_pattern")):
        reasons.append("rsLoRA with rank_pattern/alpha_pattern cannot keep every layer's scale")
    if reasons:
        raise ValueError(
            f"Adapter {adapter_name!r} cannot be converted to plain LoRA with "
            f"path_initial_model_for_weight_conversion: {'; '.join(reasons)}. Save it without conversion and load "
            f"it on the residual base model it was trained on."
        )


def convert_config_dict(data: Mapping) -> dict:
    """The converted adapter's config (as the dict PEFT serialises): rank and alpha doubled."""
    out = dict(data)
    out["init_lora_weights"] = True
    out["r"] = data["r"] * 2
    out["lora_alpha"] = data["lora_alpha"] * (2**0.5 if data.get("use_rslora") else 2)
    if data.get("rank_pattern"):
        out["rank_pattern"] = {k: 2 * v for k, v in data["rank_pattern"].items()}
    if data.get("alpha_pattern"):
        out["alpha_pattern"] = {k: 2 * v for k, v in data["alpha_pattern"].items()}
    return out


def converted_shape(key: str, shape: tuple[int, ...], initial_shape: tuple[int, ...]) -> tuple[int, ...]:
    kind = kind_of(key)
    if kind == "A":
        return (shape[0] + initial_shape[0], *shape[1:])
    if kind == "B":
        return (*shape[:-1], shape[-1] + initial_shape[-1])
    return shape


def check_initial(shapes: Mapping[str, tuple[int, ...]], initial: Mapping[str, torch.Tensor], where: str) -> None:
    """Every LoRA A/B key of the trained adapter has a compatible initial tensor, and nothing else is there."""
    problems = []
    for key, shape in shapes.items():
        kind = kind_of(key)
        if kind == "keep":
            continue
        if key not in initial:
            problems.append(f"{key} is missing")
            continue
        got = tuple(initial[key].shape)
        same = got[1:] == tuple(shape[1:]) if kind == "A" else got[:-1] == tuple(shape[:-1])
        if len(got) != len(shape) or not same:
            problems.append(f"{key} has shape {list(got)}, incompatible with the trained {list(shape)}")
    extra = sorted(k for k in initial if kind_of(k) != "keep" and k not in shapes)
    if extra:
        problems.append(f"{len(extra)} LoRA tensors the trained adapter lacks (e.g. {extra[0]})")
    if problems:
        raise ValueError(
            f"The initial adapter at {where} does not match the trained adapter: {'; '.join(problems[:5])}. Pass "
            f"the adapter saved from this model right after its PiSSA/CorDA/OLoRA initialisation."
        )


def segment(key: str, tensor: torch.Tensor, initial: torch.Tensor | None, offset: int):
    """The packed-buffer segment that writes `key`'s converted tensor at byte `offset`, and its shape.
    `initial` must already be on `tensor`'s device and in its dtype (or None: a plain copy)."""
    from shardsave.tensors.kernels import Segment

    kind = kind_of(key) if initial is not None else "keep"
    if kind == "keep":
        return Segment(offset, tensor, None, 1, tensor.numel(), 0, False), tuple(tensor.shape)
    shape = converted_shape(key, tuple(tensor.shape), tuple(initial.shape))
    if kind == "A":
        return Segment(offset, tensor, initial, 1, tensor.numel(), initial.numel(), False), shape
    rows = tensor.numel() // tensor.shape[-1]
    return Segment(offset, tensor, initial, rows, tensor.shape[-1], initial.shape[-1], True), shape


def convert_tensor(key: str, tensor: torch.Tensor, initial: torch.Tensor | None) -> torch.Tensor:
    """One converted tensor, on `tensor`'s device and in its dtype (used by the merge, one tensor at a time)."""
    from shardsave.tensors.kernels import fill_segments

    if initial is None or kind_of(key) == "keep":
        return tensor
    initial = initial.to(device=tensor.device, dtype=tensor.dtype)
    seg, shape = segment(key, tensor.detach().contiguous(), initial, 0)
    buffer = torch.empty(seg.nbytes, dtype=torch.uint8, device=tensor.device)
    fill_segments(buffer, [seg])
    return buffer.view(tensor.dtype).view(shape)
