"""The key rules on their own: pure functions over names, no model."""

from __future__ import annotations

from shardsave.layout import AuxModule, EmbeddingLayer, Layout, TunerModule, embedding_is_targeted
from shardsave.names import canonical_name, strip_adapter_name
from shardsave.select import select_adapter


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


def test_bias_rules():
    all_bias = select_adapter(LAYOUT, NAMES, "a", bias="all").entries
    assert {"m.q.base_layer.bias", "m.norm.bias"} <= set(all_bias)
    only = select_adapter(LAYOUT, NAMES, "a", bias="lora_only").entries
    assert "m.q.base_layer.bias" in only and "m.norm.bias" not in only


def test_embeddings_only_when_asked():
    assert "m.emb.weight" not in select_adapter(LAYOUT, NAMES, "a").entries
    assert "m.emb.weight" in select_adapter(LAYOUT, NAMES, "a", save_embeddings=True).entries


def test_embedding_targeting_rule():
    cands = ("model.embed_tokens", "lm_head")
    assert embedding_is_targeted(["embed_tokens", "q_proj"], cands)
    assert not embedding_is_targeted(["q_proj"], cands)
    assert not embedding_is_targeted("all-linear", cands)
    assert embedding_is_targeted(r".*embed_tokens", cands)
    assert not embedding_is_targeted(r".*q_proj", cands)
