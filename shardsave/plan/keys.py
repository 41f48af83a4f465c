"""Which state-dict entries make up one adapter, and under which checkpoint keys: PEFT's format as a pure
function of a `Layout` and the list of state-dict names (and, for `save_embedding_layers`, the configs).

No tensors pass through here, so every rank computes the same plan before anything is gathered, and the
rules can be tested without a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from shardsave.compat import PeftRules, peft_rules
from shardsave.plan.names import is_under, strip_adapter_name
from shardsave.plan.structure import Layout, resolve_save_embedding_layers, targets_embedding

__all__ = ["AdapterPlan", "select_adapter", "plan_choices", "decide_embeddings"]


@dataclass(frozen=True, slots=True)
class AdapterPlan:
    """One adapter's file: checkpoint key -> canonical state-dict name, in PEFT's insertion order."""

    adapter_name: str
    entries: dict[str, str]

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(self.entries.values()))


def select_adapter(
    layout: Layout,
    names: Sequence[str],
    adapter_name: str,
    *,
    bias: str = "none",
    use_dora: bool = False,
    save_embeddings: bool = False,
    embedding_targeted: bool = False,
    rules: PeftRules | None = None,
) -> AdapterPlan:
    """Plan the checkpoint of `adapter_name` from the state-dict `names` (in state-dict order), as the PEFT
    release `rules` describes (default: the installed one's).

    Selection is structural: a tensor belongs to the adapter because it sits in that adapter's slot of a
    tuner layer or auxiliary module, never because its name contains a string, so no adapter name (not even
    `model`) can pull in another adapter's tensors.
    """
    others_slots = {
        f"{t.path}.{member}.{name}"
        for t in layout.tuners
        for member, adapters in t.keyed.items()
        for name in adapters
        if name != adapter_name
    }
    mine = [n for n in names if not is_under(n, others_slots)]
    present = set(mine)

    tuner_prefixes: set[str] = set()
    for t in layout.tuners:
        if t.inside_aux:
            continue
        for member in t.members:
            if member in t.keyed:
                if adapter_name in t.keyed[member]:
                    tuner_prefixes.add(f"{t.path}.{member}.{adapter_name}")
            else:
                tuner_prefixes.add(f"{t.path}.{member}")
    picked: dict[str, str] = {n: n for n in mine if is_under(n, tuner_prefixes)}
    rules = rules or peft_rules()

    if bias == "all":
        picked.update({n: n for n in mine if n == "bias" or n.endswith(".bias")})
    elif bias.endswith("_only") and rules.lora_only_saves_base_bias:
        for t in layout.tuners:
            name = f"{t.path}.base_layer.bias" if t.path else "base_layer.bias"
            if t.is_layer and name in present:
                picked[name] = name

    if use_dora:
        dora_suffix = f"lora_magnitude_vector.{adapter_name}.weight"
        picked = {(k[: -len(".weight")] if k.endswith(dora_suffix) else k): v for k, v in picked.items()}

    for a in layout.aux:
        if a.kind == "modules_to_save" and adapter_name in a.adapters:
            inner = f"{a.path}.modules_to_save.{adapter_name}."
            picked.update({f"{a.path}.{n[len(inner) :]}": n for n in mine if n.startswith(inner)})
        elif a.kind == "trainable_tokens" and not a.tied:
            source = f"{a.path}.token_adapter.trainable_tokens_delta.{adapter_name}"
            if source in present:
                picked[f"{a.path}.token_adapter.trainable_tokens_delta"] = source

    if save_embeddings:
        for e in layout.embeddings:
            if embedding_targeted and not e.has_valid_base:
                continue
            module = e.base_name if embedding_targeted else e.name
            if module and rules.embedding_keys_by_prefix:
                picked.update({n: n for n in mine if n.startswith(f"{module}.")})
            elif module:
                picked.update({n: n for n in mine if module in n})

    return AdapterPlan(adapter_name, {strip_adapter_name(k, adapter_name): v for k, v in picked.items()})


def plan_choices(layout: Layout, peft_model, names: Sequence[str], selected: list[str], value) -> dict:
    """Each adapter's plan for each embeddings decision `value` allows ("auto": both, decided by the writer).
    No file is read here."""
    choices: dict[str, dict[bool, AdapterPlan]] = {}
    rules = peft_rules()
    for name in selected:
        config = peft_model.peft_config[name]
        if str(getattr(config, "bias", "none")).endswith("_only") and not rules.lora_only_saves_base_bias:
            warnings.warn(
                f"Adapter {name!r} has bias={config.bias!r}, but the installed PEFT (before 0.21) saves no bias for "
                f"it: neither its save_pretrained nor shardsave's (which writes what PEFT writes) holds the trained "
                f"biases. Upgrade PEFT to 0.21 or later to save them.",
                stacklevel=3,
            )
        targeted = targets_embedding(value, config=config, candidates=layout.embedding_candidates, rules=rules)
        options = (True, False) if value == "auto" else (bool(value),)
        choices[name] = {
            option: select_adapter(
                layout,
                names,
                name,
                bias=getattr(config, "bias", "none"),
                use_dora=bool(getattr(config, "use_dora", False)),
                save_embeddings=option,
                embedding_targeted=targeted,
                rules=rules,
            )
            for option in options
        }
    return choices


def decide_embeddings(layout: Layout, peft_model, selected: list[str], value) -> dict[str, bool]:
    """The writer's `save_embedding_layers` decision per adapter (reads the base model's config for "auto")."""
    return {
        name: resolve_save_embedding_layers(
            value, config=peft_model.peft_config[name], peft_model=peft_model, candidates=layout.embedding_candidates
        )[0]
        for name in selected
    }
