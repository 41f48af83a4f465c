"""shardsave.save_pretrained in one process writes what PeftModel.save_pretrained writes, and PEFT loads it."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, TaskType
from tiny import assert_same_files, load_and_compare, peft_model

import shardsave
from shardsave.compat import peft_rules

QV = ["q_proj", "v_proj"]

VARIANTS = {
    "qv": dict(lora=dict(target_modules=QV)),
    "all_linear": dict(lora=dict(target_modules="all-linear")),
    "regex_targets": dict(lora=dict(target_modules=r".*\.(q_proj|o_proj)")),
    "dora": dict(lora=dict(target_modules=QV, use_dora=True)),
    "rslora_patterns": dict(
        lora=dict(
            target_modules=QV + ["down_proj"],
            use_rslora=True,
            r=4,
            rank_pattern={"v_proj": 6},
            alpha_pattern={"down_proj": 3},
        )
    ),
    "modules_to_save": dict(lora=dict(target_modules=QV, modules_to_save=["lm_head", "norm"])),
    "embed_targeted": dict(lora=dict(target_modules=["embed_tokens", "q_proj"])),
    "embed_targeted_tied": dict(lora=dict(target_modules=["embed_tokens", "q_proj"]), model=dict(tie=True)),
    "lm_head_targeted": dict(lora=dict(target_modules=["lm_head", "v_proj"])),
    "bias_all": dict(lora=dict(target_modules=QV, bias="all"), model=dict(bias=True)),
    # PEFT before 0.21 saves no bias for "lora_only" (shardsave warns), so its files do not give the trained model
    "bias_lora_only": dict(
        lora=dict(target_modules=QV, bias="lora_only"),
        model=dict(bias=True),
        load=peft_rules().lora_only_saves_base_bias,
    ),
    "lora_bias": dict(lora=dict(target_modules=QV, lora_bias=True)),
    "trainable_tokens": dict(lora=dict(target_modules=QV, trainable_token_indices=[3, 5, 7])),
    "trainable_tokens_tied": dict(lora=dict(target_modules=QV, trainable_token_indices=[3, 5]), model=dict(tie=True)),
    # PEFT itself cannot load this combination back (TrainableTokensLayer over a modules_to_save copy), so
    # only the files are compared.
    "tokens_and_copies_tied": dict(
        lora=dict(target_modules=QV, trainable_token_indices=[1, 2], modules_to_save=["lm_head"]),
        model=dict(tie=True),
        load=False,
    ),
    "bf16": dict(lora=dict(target_modules=QV, modules_to_save=["lm_head"]), dtype=torch.bfloat16),
    "fp16": dict(lora=dict(target_modules=QV), dtype=torch.float16),
    "seq_cls": dict(lora=dict(target_modules=QV, task_type=TaskType.SEQ_CLS), seq_cls=True),
    "causal_task": dict(lora=dict(target_modules=QV, task_type=TaskType.CAUSAL_LM)),
    "no_task_type": dict(lora=dict(target_modules=QV)),
}


def build(variant: dict):
    return peft_model(
        LoraConfig(**variant["lora"]),
        seq_cls=variant.get("seq_cls", False),
        dtype=variant.get("dtype"),
        **variant.get("model", {}),
    )


def save_both(model, tmp_path, **kwargs):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    with warnings.catch_warnings(record=True) as ours_warnings:
        warnings.simplefilter("always")
        shardsave.save_pretrained(model, ours, **kwargs)
    with warnings.catch_warnings(record=True) as theirs_warnings:
        warnings.simplefilter("always")
        model.save_pretrained(str(theirs), **kwargs)
    return ours, theirs, ours_warnings, theirs_warnings


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_peft_and_loads(name, tmp_path):
    variant = VARIANTS[name]
    model = build(variant)
    ours, theirs, _, _ = save_both(model, tmp_path)
    assert_same_files(ours, theirs, model)
    if variant.get("load", True):
        load_and_compare(
            model, ours, seq_cls=variant.get("seq_cls", False), dtype=variant.get("dtype"), **variant.get("model", {})
        )


@pytest.mark.parametrize("choice", ["auto", True, False])
@pytest.mark.parametrize("name", ["qv", "embed_targeted", "embed_targeted_tied", "trainable_tokens", "modules_to_save"])
def test_save_embedding_layers(name, choice, tmp_path):
    model = build(VARIANTS[name])
    ours, theirs, ours_w, theirs_w = save_both(model, tmp_path, save_embedding_layers=choice)
    assert_same_files(ours, theirs, model)
    relevant = [str(w.message) for w in theirs_w if "save_embedding_layers" in str(w.message)]
    assert relevant == [str(w.message) for w in ours_w if "save_embedding_layers" in str(w.message)]


def test_resized_vocabulary_saves_embeddings_like_peft(tmp_path):
    """'auto' compares the vocab with the base config in a local directory, as PEFT does."""
    from tiny import llama_config

    base_dir = tmp_path / "base"
    llama_config(vocab=64).save_pretrained(base_dir)  # the "original" base had a smaller vocab
    model = build(VARIANTS["qv"])
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    ours, theirs, ours_w, _ = save_both(model, tmp_path)
    assert_same_files(ours, theirs, model)
    from safetensors import safe_open

    with safe_open(ours / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.model.embed_tokens.weight" in f.keys()
    assert any("resized" in str(w.message) for w in ours_w)


def test_unknown_hub_base_warns_offline(tmp_path):
    model = build(VARIANTS["qv"])
    model.peft_config["default"].base_model_name_or_path = "some-org/not-on-this-machine"
    with pytest.warns(UserWarning, match="Could not find a config file in some-org/not-on-this-machine"):
        shardsave.save_pretrained(model, tmp_path / "ours")


def test_bin_format_matches_peft(tmp_path):
    model = build(VARIANTS["modules_to_save"])
    ours, theirs, _, _ = save_both(model, tmp_path, safe_serialization=False)
    assert (ours / "adapter_model.bin").exists() and not (ours / "adapter_model.safetensors").exists()
    assert_same_files(ours, theirs, model)
    load_and_compare(model, ours)


def test_several_adapters_and_selection(tmp_path):
    second = LoraConfig(target_modules=["k_proj"], r=4, modules_to_save=["lm_head"])
    third = LoraConfig(target_modules=QV, use_dora=True)
    model = peft_model(LoraConfig(target_modules=QV), adapters=[("second", second), ("third", third)])
    ours, theirs, _, _ = save_both(model, tmp_path / "all")
    assert (ours / "second" / "adapter_model.safetensors").exists()
    assert_same_files(ours, theirs, model)
    for adapter in ("default", "second", "third"):
        load_and_compare(model, ours, adapter=adapter)

    ours, theirs, _, _ = save_both(model, tmp_path / "some", selected_adapters=["third"])
    assert_same_files(ours, theirs, model)
    assert not (ours / "adapter_model.safetensors").exists()


def test_adapter_named_model_does_not_leak_others(tmp_path):
    """PEFT's name filter leaks other adapters' tensors for an adapter called `model`; ours is structural."""
    model = peft_model(LoraConfig(target_modules=QV), adapters=[("model", LoraConfig(target_modules=["k_proj"]))])
    shardsave.save_pretrained(model, tmp_path / "out", selected_adapters=["model"])
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("k_proj" in k for k in keys), keys


def test_torch_compile_wrapper_gives_same_files(tmp_path):
    model = build(VARIANTS["qv"])
    compiled = torch.compile(model)
    shardsave.save_pretrained(compiled, tmp_path / "compiled")
    model.save_pretrained(str(tmp_path / "theirs"))
    assert_same_files(tmp_path / "compiled", tmp_path / "theirs", model)


def test_caller_model_and_config_untouched(tmp_path):
    model = build(VARIANTS["qv"])
    config = model.peft_config["default"]
    before = (config.base_model_name_or_path, config.inference_mode)
    config.base_model_name_or_path = None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shardsave.save_pretrained(model, tmp_path / "out")
    assert config.base_model_name_or_path is None and config.inference_mode == before[1]
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_gather_state_dict_single_process():
    model = build(VARIANTS["modules_to_save"])
    gathered = shardsave.gather_state_dict(model)
    expected = {k: v for k, v in model.named_parameters() if v.requires_grad}
    assert set(gathered) == set(expected)
    assert all(torch.equal(gathered[k], expected[k]) for k in expected)
    some = shardsave.gather_state_dict(model, keep=lambda name, info: "lora_A" in name)
    assert some and all("lora_A" in k for k in some)
    with pytest.raises(KeyError, match="not state-dict names"):
        shardsave.gather_state_dict(model, keep=["nope"])
