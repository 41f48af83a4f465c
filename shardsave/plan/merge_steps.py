"""The merge plan: which base tensor each adapter tensor changes, and how, from metadata alone.

PEFT's `merge_and_unload` (PEFT 0.21) as data: from each adapter's config and saved keys, the `Step`s PEFT applies
to each base tensor, in its order (`plan_merge`), so that a streaming writer knows, per base tensor, which
adapter tensors it needs before it reads one. No tensors, no I/O: the arithmetic that carries the steps out is
`shardsave.tensors.merge_math`'s. What PEFT cannot merge, or shardsave does not, is refused by name
(`MergeRefused`) here, before anything is read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shardsave.errors import MergeRefused

__all__ = [
    "MergeRefused",
    "Step",
    "PEFT_PREFIX",
    "pattern_key",
    "check_mergeable",
    "module_scaling",
    "plan_adapter",
    "plan_merge",
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


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern that matches the module name's end (as a regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_scaling(config: Mapping, module: str) -> tuple[int, float, float]:
    """`(r, lora_alpha, scaling)` PEFT gives `module` (the base model's module name): `rank_pattern` and
    `alpha_pattern` first, `lora_alpha / sqrt(r)` under rsLoRA, else `lora_alpha / r`."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = pattern_key(ranks, module), pattern_key(alphas, module)
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
