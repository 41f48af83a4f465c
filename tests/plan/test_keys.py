"""The key rules on their own: pure functions over names, no model."""

from __future__ import annotations

import pytest
from peft import LoraConfig

from shardsave.compat import peft_rules
from shardsave.plan.keys import select_adapter
from shardsave.plan.names import canonical_name, strip_adapter_name
from shardsave.plan.structure import (
    AuxModule,
    EmbeddingLayer,
    Layout,
    TunerModule,
    embedding_is_targeted,
    targets_embedding,
)


def test_canonical_name_strips_every_wrapper_component():
    raw = (
        "_orig_mod.base_model.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module"
        ".q_proj.lora_A.default.weight"
    )
    assert canonical_name(raw) == "base_model.model.layers.0.q_proj.lora_A.default.weight"
    assert canonical_name("a.orig_mod.b") == "a.orig_mod.b"


def test_strip_adapter_name_positions_only():
    assert strip_adapter_name("m.q.lora_A.default.weight", "default") == "m.q.lora_A.weight"
    assert strip_adapter_name("m.e.lora_embedding_A.default", "default") == "m.e.lora_embedding_A"
    assert strip_adapter_name("default.q.lora_A.default.weight", "default") == "default.q.lora_A.weight"
    assert strip_adapter_name("m.lm_head.weight", "default") == "m.lm_head.weight"


LAYER = TunerModule(
    "m.q",
    ("lora_A", "lora_B", "lora_dropout"),
    {"lora_A": frozenset({"a", "b"}), "lora_B": frozenset({"a", "b"}), "lora_dropout": frozenset({"a", "b"})},
    True,
    False,
)
HEAD = AuxModule("m.head", "modules_to_save", frozenset({"a"}), False)
HEAD_SLOTS = TunerModule("m.head", (), {"modules_to_save": frozenset({"a"})}, False, True)
NAMES = [
    "m.q.base_layer.weight",
    "m.q.base_layer.bias",
    "m.q.lora_A.a.weight",
    "m.q.lora_B.a.weight",
    "m.q.lora_A.b.weight",
    "m.q.lora_B.b.weight",
    "m.head.original_module.weight",
    "m.head.modules_to_save.a.weight",
    "m.emb.weight",
    "m.norm.bias",
]
LAYOUT = Layout((LAYER, HEAD_SLOTS), (HEAD,), (EmbeddingLayer("m.emb", None, False),), ("emb",))


def test_selection_is_structural_and_ordered():
    plan = select_adapter(LAYOUT, NAMES, "a")
    assert plan.entries == {
        "m.q.lora_A.weight": "m.q.lora_A.a.weight",
        "m.q.lora_B.weight": "m.q.lora_B.a.weight",
        "m.head.weight": "m.head.modules_to_save.a.weight",
    }
    other = select_adapter(LAYOUT, NAMES, "b")
    assert list(other.entries.values()) == ["m.q.lora_A.b.weight", "m.q.lora_B.b.weight"]


@pytest.mark.parametrize("peft", ["0.15.0", "0.20.0", "0.21.2"])
def test_bias_rules(peft):
    rules = peft_rules(peft)
    all_bias = select_adapter(LAYOUT, NAMES, "a", bias="all", rules=rules).entries
    assert {"m.q.base_layer.bias", "m.norm.bias"} <= set(all_bias)
    only = select_adapter(LAYOUT, NAMES, "a", bias="lora_only", rules=rules).entries
    assert "m.norm.bias" not in only
    # PEFT before 0.21 looked for `m.q.bias`, which a LoRA layer does not have: it saved no bias
    assert ("m.q.base_layer.bias" in only) == (peft >= "0.21")


def test_embeddings_only_when_asked():
    assert "m.emb.weight" not in select_adapter(LAYOUT, NAMES, "a").entries
    assert "m.emb.weight" in select_adapter(LAYOUT, NAMES, "a", save_embeddings=True).entries


def test_embedding_targeting_rule():
    cands = ("model.embed_tokens", "lm_head")
    new, old = peft_rules("0.21.2"), peft_rules("0.16.0")
    for rules in (new, old):
        assert embedding_is_targeted(["embed_tokens", "q_proj"], cands, rules)
        assert not embedding_is_targeted(["q_proj"], cands, rules)
        assert not embedding_is_targeted("all-linear", cands, rules)
        assert embedding_is_targeted(r".*embed_tokens", cands, rules)
        assert not embedding_is_targeted(r".*q_proj", cands, rules)
    # a regex: matched against module names from 0.17 on, searched for the names as text before
    assert not embedding_is_targeted(r".*(embed_tokens)", ("model.other",), new)
    assert embedding_is_targeted(r".*(embed_tokens)", ("model.other",), old)


def test_embedding_keys_by_prefix_from_peft_0_21():
    names = ["m.emb.weight", "m.emb_extra.weight", "m.q.lora_A.a.weight"]
    layout = Layout((), (), (EmbeddingLayer("m.emb", None, False),), ("emb",))
    new = select_adapter(layout, names, "a", save_embeddings=True, rules=peft_rules("0.21.0")).entries
    old = select_adapter(layout, names, "a", save_embeddings=True, rules=peft_rules("0.20.0")).entries
    assert list(new) == ["m.emb.weight"]
    assert list(old) == ["m.emb.weight", "m.emb_extra.weight"]  # every name containing the module's


def test_targets_embedding_before_and_after_peft_0_17():
    config = LoraConfig(target_modules=["embed_tokens", "q_proj"], trainable_token_indices=[1])
    cands = ("model.embed_tokens",)
    for value in ("auto", True, False):
        assert targets_embedding(value, config=config, candidates=cands, rules=peft_rules("0.17.0"))
    old = peft_rules("0.16.0")
    assert not targets_embedding(True, config=config, candidates=cands, rules=old)
    assert targets_embedding("auto", config=config, candidates=cands, rules=old)  # indices did not count then
