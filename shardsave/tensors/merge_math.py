"""PEFT's merge arithmetic (`merge_and_unload`, PEFT 0.21) for one base tensor, or any flat element range of it.

Pure functions: no I/O, no collectives, so the offline merge (`shardsave.merged`) and an in-training merge of
sharded weights can share them. Two parts:

- the plan (`plan_merge`): from each adapter's config and saved keys alone, which base tensor each adapter
  tensor changes and how (`Step`), in the order PEFT applies them: a streaming writer knows, per base tensor,
  which adapter tensors it needs;
- the arithmetic (`merge_tensor`): the same operations, dtype promotions and order as PEFT (`get_delta_weight`,
  `Linear.merge` / `Embedding.merge`, the DoRA variant's `merge_unsafe`, `TrainableTokensLayer.merge`, the
  `modules_to_save` copy), so the result is bit-equal to `merge_and_unload()` given the adapter tensors in the
  dtype PEFT holds them at merge time (`merge_dtype`). On a range, every operation is elementwise per base
  element except DoRA's weight norm, which needs whole rows: the caller passes it (`weight_norms`) unless the
  range covers whole rows. Where results are not bit-equal, the docstrings say so.

What PEFT cannot merge, or this module does not, is refused by name (`MergeRefused`) when planning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from shardsave.errors import MergeRefused

__all__ = [
    "MergeRefused",
    "Step",
    "PEFT_PREFIX",
    "check_mergeable",
    "module_scaling",
    "plan_adapter",
    "plan_merge",
    "merge_dtype",
    "lora_delta",
    "dora_weight_norm",
    "merge_tensor",
]

#: What PEFT puts in front of the base model's own keys in a saved adapter.
PEFT_PREFIX = "base_model.model."

# saved-key suffix -> (step kind, role of the tensor); the base tensor is the module's .weight (.bias for "bias")
_SUFFIXES = (
    (".lora_A.weight", "lora", "A"),
    (".lora_B.weight", "lora", "B"),
    (".lora_B.bias", "bias", "bias"),
    (".lora_embedding_A", "embedding", "A"),
    (".lora_embedding_B", "embedding", "B"),
    (".lora_magnitude_vector", "lora", "magnitude"),
    (".token_adapter.trainable_tokens_delta", "tokens", "delta"),
)
# LoraConfig fields whose (truthy) value selects a variant or a layout PEFT's plain merge does not cover
_REFUSED_OPTIONS = {
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "replicated layers (layer_replication), which PEFT itself refuses to merge",
    "megatron_config": "Megatron tensor-parallel LoRA layers (megatron_config)",
    "use_qalora": "QA-LoRA (use_qalora), which needs the quantized base",
    "use_bdlora": "the BD-LoRA variant (use_bdlora)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens), whose adapter applies only after its tokens",
    "arrow_config": "Arrow routing (arrow_config), which PEFT itself refuses to merge",
    "velora_config": "the VeLoRA variant (velora_config)",
    "monteclora_config": "the MonteCLoRA variant (monteclora_config)",
    "kasa_config": "the KaSA variant (kasa_config)",
}
_CONVERT_FIRST = ("pissa", "corda", "olora")


@dataclass(frozen=True, slots=True)
class Step:
    """One change PEFT's merge makes to one base tensor, for one adapter.

    kind: "replace" (the tensor is the adapter's copy: `modules_to_save`, or an embedding PEFT saved whole),
    "lora" (a Linear's `W += transpose(B @ A) * scaling`; DoRA when `tensors` has "magnitude"), "embedding"
    (an Embedding's `W += (B @ A).T * scaling`), "bias" (`lora_bias`: `b += B.bias * scaling`), "tokens"
    (trainable tokens: rows `token_indices` replaced by the delta's rows).
    """

    adapter: str
    kind: str
    module: str  # the base model's module name, e.g. "model.layers.0.self_attn.q_proj"
    tensors: Mapping[str, str]  # role ("A", "B", "magnitude", "bias", "value", "delta") -> saved adapter key
    scaling: float = 1.0
    fan_in_fan_out: bool = False
    token_indices: tuple[int, ...] = ()

    @property
    def dora(self) -> bool:
        return "magnitude" in self.tensors


def _pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern that matches the module name's end (as a regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_scaling(config: Mapping, module: str) -> tuple[int, float, float]:
    """`(r, lora_alpha, scaling)` PEFT gives `module` (the base model's module name): `rank_pattern` and
    `alpha_pattern` first, `lora_alpha / sqrt(r)` under rsLoRA, else `lora_alpha / r`."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = _pattern_key(ranks, module), _pattern_key(alphas, module)
    r = ranks[r_key] if r_key is not None else config.get("r", 8)
    alpha = alphas[a_key] if a_key is not None else config.get("lora_alpha", 8)
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, alpha, scaling


def check_mergeable(config: Mapping, *, adapter_name: str = "default") -> None:
    """Refuse, by name, an adapter config whose merge this module cannot reproduce exactly."""
    peft_type = str(config.get("peft_type", "LORA")).removeprefix("PeftType.")
    if peft_type != "LORA":
        raise MergeRefused(f"adapter {adapter_name!r}: a {peft_type} adapter; shardsave merges LoRA-family adapters.")
    for option, what in _REFUSED_OPTIONS.items():
        if config.get(option):
            raise MergeRefused(f"adapter {adapter_name!r}: {what} cannot be merged by shardsave.")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_CONVERT_FIRST):
        raise MergeRefused(
            f"adapter {adapter_name!r}: init_lora_weights={init!r}: the adapter is relative to a modified (residual) "
            f"base, not to the base model. Convert it to plain LoRA first (python -m shardsave.merge SHARDS "
            f"--initial-adapter INITIAL, or PEFT's path_initial_model_for_weight_conversion), then merge that."
        )
    if isinstance(init, str) and init.lower() in ("mica", "loftq"):
        raise MergeRefused(f"adapter {adapter_name!r}: init_lora_weights={init!r} cannot be merged by shardsave.")


def _token_indices(config: Mapping, module: str, adapter_name: str) -> tuple[int, ...]:
    spec = config.get("trainable_token_indices")
    if isinstance(spec, Mapping):
        for name, indices in spec.items():
            if module == name or module.endswith("." + name):
                return tuple(int(i) for i in indices)
        raise MergeRefused(
            f"adapter {adapter_name!r}: trainable tokens on {module}, but trainable_token_indices names "
            f"{sorted(spec)}; the config does not fit the adapter's tensors."
        )
    if not spec:
        raise MergeRefused(f"adapter {adapter_name!r}: trainable tokens on {module} but no trainable_token_indices.")
    return tuple(int(i) for i in spec)


def plan_adapter(config: Mapping, keys: Iterable[str], *, adapter_name: str = "default") -> dict[str, list[Step]]:
    """Base key -> the steps of this adapter on it (replace first, then the adapter's change), from the adapter's
    config (adapter_config.json as a dict) and its saved keys (PEFT's, adapter name removed). A key that is none
    of PEFT's adapter tensors is a copy of the base tensor of the same name (`modules_to_save`, a saved
    embedding under `base_layer.`): it replaces it."""
    check_mergeable(config, adapter_name=adapter_name)
    groups: dict[tuple[str, str], dict[str, str]] = {}
    replaces: dict[str, str] = {}
    for key in keys:
        name = key.removeprefix(PEFT_PREFIX)
        for suffix, kind, role in _SUFFIXES:
            if name.endswith(suffix):
                groups.setdefault((name[: -len(suffix)], kind), {})[role] = key
                break
        else:
            base_key = name.replace(".base_layer.", ".")
            if base_key in replaces:
                raise MergeRefused(f"adapter {adapter_name!r}: {replaces[base_key]} and {key} both copy {base_key}.")
            replaces[base_key] = key
    plan: dict[str, list[Step]] = {k: [Step(adapter_name, "replace", k.rsplit(".", 1)[0], {"value": v})]
                                   for k, v in replaces.items()}  # fmt: skip
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for (module, kind), tensors in groups.items():
        need = {"lora": {"A", "B"}, "embedding": {"A", "B"}, "bias": {"bias"}, "tokens": {"delta"}}[kind]
        if not need <= set(tensors):
            raise MergeRefused(
                f"adapter {adapter_name!r}: {module} has {sorted(tensors)} but lacks {sorted(need - set(tensors))}; "
                f"the adapter file is incomplete."
            )
        if kind == "lora" and "magnitude" in tensors and config.get("use_dora") is False:
            raise MergeRefused(f"adapter {adapter_name!r}: {module} has a DoRA magnitude but use_dora is false.")
        if kind == "embedding" and config.get("use_dora"):
            raise MergeRefused(f"adapter {adapter_name!r}: DoRA on the embedding {module} is not merged by shardsave.")
        scaling = module_scaling(config, module)[2]
        indices = _token_indices(config, module, adapter_name) if kind == "tokens" else ()
        target = module + (".bias" if kind == "bias" else ".weight")
        plan.setdefault(target, []).append(
            Step(adapter_name, kind, module, dict(sorted(tensors.items())), scaling,
                 fan_in_fan_out and kind in ("lora", "bias"), indices)
        )  # fmt: skip
    return plan


def plan_merge(adapters: Sequence[tuple[str, Mapping, Iterable[str]]]) -> dict[str, list[Step]]:
    """Base key -> steps, for several adapters merged together (`selected_adapters`, in that order: PEFT's order).

    Each adapter is `(name, config, saved keys)`. PEFT loads every adapter before merging, so copies (replace)
    land first; of `modules_to_save` it keeps the active (first) adapter's copy only: a copy in a later adapter
    is refused, as is a copy beside another change of the same tensor from another adapter."""
    merged: dict[str, list[Step]] = {}
    for position, (name, config, keys) in enumerate(adapters):
        for base_key, steps in plan_adapter(config, keys, adapter_name=name).items():
            if steps[0].kind == "replace" and position > 0:
                raise MergeRefused(
                    f"adapter {name!r}: holds a copy of {base_key} (modules_to_save or a saved embedding); PEFT keeps "
                    f"only the first (active) adapter's copy. Merge {name!r} first, or alone."
                )
            merged.setdefault(base_key, []).extend(steps)
    for base_key, steps in merged.items():
        if len({s.kind for s in steps} & {"tokens"}) and any(s.kind != "tokens" for s in steps):
            raise MergeRefused(f"{base_key}: trainable tokens and another change of the same tensor are not merged.")
    return merged


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
