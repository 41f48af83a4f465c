"""The plan `plan.keys` makes on PEFT's meta-device skeleton, predicted from metadata alone, where that is exact.

The rescue's skeleton (`plan.skeleton.peft_skeleton`) costs the imports of peft and transformers, seconds and
hundreds of MiB, for a plan that, on a decoder of a family whose module tree is known, follows from the base
model's config.json and the adapter configs as JSON: which modules LoRA wraps (PEFT's target matching), each
LoRA tensor's shape (r from `rank_pattern`, the Linear's features from config.json), the keys PEFT saves (the
adapter name dropped, `plan.names.strip_adapter_name`) in the skeleton's state-dict order. `predict_plan`
answers only when every input is one whose effect it knows; anything else (another family, embeddings
targeted or resized, trainable tokens, bias, layer selection, a target it cannot match exactly...) returns
the reason, and the caller builds the skeleton as before. Pure: no I/O, no torch, no peft.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from shardsave.plan.keys import AdapterPlan
from shardsave.plan.merge_steps import pattern_key
from shardsave.plan.names import strip_adapter_name

__all__ = ["Predicted", "predict_plan", "FAMILIES"]

#: Decoder families whose transformers module tree is Llama's: `model.embed_tokens`, `model.layers.N` (self_attn:
#: q, k, v, o; mlp: gate, up, down; two norms), `model.norm`, `model.rotary_emb`, `lm_head`, in that order.
FAMILIES = {
    "llama": ("LlamaForCausalLM", "transformers.models.llama.modeling_llama"),
    "mistral": ("MistralForCausalLM", "transformers.models.mistral.modeling_mistral"),
    "qwen2": ("Qwen2ForCausalLM", "transformers.models.qwen2.modeling_qwen2"),
}
_LAYER = (
    ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("mlp", ("gate_proj", "up_proj", "down_proj", "act_fn")),
    ("input_layernorm", ()),
    ("post_attention_layernorm", ()),
)
_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
#: The LoRA layer's per-adapter members, in the order the layer registers them (state-dict order).
_MEMBERS = ("lora_A", "lora_B", "lora_magnitude_vector")
#: Fields whose value the prediction knows the effect of, and that value (anything else: the skeleton).
_NEUTRAL = {
    "bias": ("none",),
    "lora_bias": (False,),
    "layers_to_transform": (None,),
    "layers_pattern": (None,),
    "exclude_modules": (None, [], ()),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "megatron_config": (None,),
    "fan_in_fan_out": (False,),
    "layer_replication": (None,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False,),
    "ensure_weight_tying": (False,),
    "use_bdlora": (None, False),
}
_INIT = (True, False, "gaussian")


@dataclass(frozen=True, slots=True)
class Predicted:
    """The plans (first adapter first), model name -> checkpoint name for every tensor, the shapes expected."""

    plans: list[AdapterPlan]
    sources: dict[str, str]


def _modules(layers: int) -> list[str]:
    """Every module name of the base model (`named_modules` order, the root left out)."""
    out = ["model", "model.embed_tokens", "model.layers"]
    for i in range(layers):
        out.append(f"model.layers.{i}")
        for child, grand in _LAYER:
            out.append(f"model.layers.{i}.{child}")
            out += [f"model.layers.{i}.{child}.{g}" for g in grand]
    return out + ["model.norm", "model.rotary_emb", "lm_head"]


def _features(base: Mapping, leaf: str) -> tuple[int, int] | None:
    """(in_features, out_features) of a Llama-family Linear, from config.json."""
    try:
        hidden, heads = int(base["hidden_size"]), int(base["num_attention_heads"])
        kv = int(base.get("num_key_value_heads") or heads)
        head_dim = int(base.get("head_dim") or hidden // heads)
        inter = int(base["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return None
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }.get(leaf)


def _matches(target, key: str) -> bool:
    """PEFT's `check_target_module_exists` for a list or a regex string (no layer selection)."""
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    return any(key == t or key.endswith(f".{t}") for t in target)


def _unknown(config: Mapping) -> str | None:
    if config.get("peft_type") != "LORA" or config.get("task_type") not in (None, "CAUSAL_LM"):
        return "not a causal-LM LoRA"
    for field, allowed in _NEUTRAL.items():
        if config.get(field) not in allowed:
            return f"{field}={config.get(field)!r}"
    for field, value in config.items():  # sub-configs: __post_init__ rebuilds them as dataclasses (new fields)
        if field.endswith("_config") and field != "loftq_config" and value is not None:
            return f"{field}={value!r}"
    if config.get("loftq_config") not in (None, {}):  # reset to {} (with a warning) unless init is loftq
        return "loftq_config"
    if config.get("init_lora_weights", True) not in _INIT:
        return "an initialisation that needs the base weights"
    target = config.get("target_modules")
    if not (isinstance(target, str) and target != "all-linear" or isinstance(target, list) and target):
        return f"target_modules={target!r}"
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            return field
    if not isinstance(config.get("r"), int) or isinstance(config.get("r"), bool):
        return "r"
    return None


def predict_plan(
    base: Mapping, configs: Mapping[str, Mapping], checkpoint: Mapping[str, tuple], *, base_vocab_equal: bool
) -> Predicted | str:
    """The skeleton path's plans for adapters `configs` (name -> adapter_config.json's dict, first first) on the
    base model of config.json `base`, for a checkpoint holding `checkpoint` (canonical name -> (shape, dtype)),
    or why it cannot be predicted exactly. `base_vocab_equal`: config.json's vocabulary is the one PEFT's
    `save_embedding_layers="auto"` check compares with (or that check does not apply)."""
    family = base.get("model_type")
    if family not in FAMILIES or base.get("tie_word_embeddings") is not False or "quantization_config" in base:
        return f"a base model of type {family!r} (tied, quantised or not of a known family)"
    if not base_vocab_equal:
        return "the vocabulary PEFT checks the embeddings against is another config's"
    layers = base.get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        return "num_hidden_layers"
    modules = _modules(layers)
    # the checkpoint's prefix: the one under which its LoRA tensors are the model's (saved from the PeftModel,
    # from the model inside it, or from one holding it)
    lora = re.compile(r"^(?P<module>.*)\.(?:" + "|".join(_MEMBERS) + r")\.[^.]+(?:\.weight)?$")
    prefixes = set()
    for name in checkpoint:
        m = lora.match(name)
        if m is not None:
            module = m["module"]
            tail = next((module[len(p) :] for p in ("base_model.model.",) if module.startswith(p)), None)
            prefixes.add(None if tail is None else module[: len(module) - len(tail)])
    if prefixes != {"base_model.model."}:
        return "checkpoint names saved under another prefix"
    vocab = base.get("vocab_size")
    for name in ("base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"):
        found = checkpoint.get(name)
        if found is not None and (not found[0] or found[0][0] != vocab):
            return "a resized embedding"
    plans, sources = [], {}
    for adapter, config in configs.items():
        why = _unknown(config)
        if why is not None:
            return why
        plan = _plan_one(adapter, config, base, modules, checkpoint, layers)
        if isinstance(plan, str):
            return plan
        plans.append(plan)
        sources.update({src: src for src in plan.entries.values()})
    held = {n for n in checkpoint if ".lora_" in n or ".modules_to_save." in n or "trainable_tokens" in n}
    if held != set(sources):
        return "the checkpoint's adapter tensors are not the predicted ones"
    return Predicted(plans, sources)


def _plan_one(adapter: str, config: Mapping, base: Mapping, modules: list[str], checkpoint, layers: int):
    target = config["target_modules"]
    matched = [m for m in modules if _matches(target, m)]
    if not matched or any(m.rsplit(".", 1)[-1] not in _LINEAR for m in matched):
        return "target_modules match modules other than the decoder's Linears"
    if isinstance(target, str):
        targeted = any(re.fullmatch(target, c) for c in ("model.embed_tokens", "lm_head"))
    else:
        targeted = any(name in target for name in ("embed_tokens", "lm_head"))
    if targeted:
        return "an embedding targeted"
    saves = config.get("modules_to_save") or []
    if not isinstance(saves, list) or any(t != "lm_head" for t in saves):
        return "modules_to_save other than lm_head"  # PEFT matches them by suffix: only lm_head is unambiguous
    wrapped = ["lm_head"] if saves else []
    r = config["r"]
    ranks = config.get("rank_pattern") or {}
    entries: dict[str, str] = {}
    dora = bool(config.get("use_dora"))
    for module in matched:
        features = _features(base, module.rsplit(".", 1)[-1])
        if features is None:
            return "config.json lacks a Linear's size"
        key = pattern_key(list(ranks), module) if ranks else module
        rank = ranks.get(key, r)
        shapes = {"lora_A": (rank, features[0]), "lora_B": (features[1], rank)}
        if dora:
            shapes["lora_magnitude_vector"] = (features[1],)
        for member, shape in shapes.items():
            src = f"base_model.model.{module}.{member}.{adapter}.weight"
            if src not in checkpoint or tuple(checkpoint[src][0]) != shape:
                return f"{src} absent or not {list(shape)}"
            saved = src[: -len(".weight")] if member == "lora_magnitude_vector" else src
            entries[strip_adapter_name(saved, adapter)] = src
    vocab, hidden = base.get("vocab_size"), base.get("hidden_size")
    for module in wrapped:
        src = f"base_model.model.{module}.modules_to_save.{adapter}.weight"
        shape = (vocab, hidden)
        if src not in checkpoint or tuple(checkpoint[src][0]) != shape:
            return f"{src} absent or not {list(shape)}"
        entries[f"base_model.model.{module}.weight"] = src
    return AdapterPlan(adapter, entries)
