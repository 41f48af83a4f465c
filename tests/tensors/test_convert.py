"""PiSSA / CorDA / OLoRA -> LoRA: PEFT's bytes where PEFT is right, the trained logits on the original base,
and the cases where PEFT is wrong handled on purpose."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny import assert_same_files, base_model, logits, pissa_model, save_initial, train_a_little

import shardsave
from shardsave.tensors.convert import convert_config_dict, convert_tensor, kind_of

QV = ["q_proj", "v_proj"]


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def prepare(tmp_path, lora, init="pissa", **kwargs):
    model = pissa_model(lora, init=init, **kwargs)
    save_initial(model, tmp_path / "init")
    train_a_little(model)
    return model


def on_original_base(directory, dtype=None, **config_kwargs):
    base = base_model(**config_kwargs)
    if dtype is not None:
        base.to(getattr(torch, dtype))
    return PeftModel.from_pretrained(base, str(directory), autocast_adapter_dtype=False).eval()


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("lora", [dict(target_modules=QV), dict(target_modules=QV, use_rslora=True, r=4)])
def test_matches_peft_conversion_and_original_base_logits(init, lora, tmp_path):
    model = prepare(tmp_path, lora, init=init)
    before = snapshot(tmp_path / "init")
    shardsave.save_pretrained(model, tmp_path / "ours", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert snapshot(tmp_path / "init") == before  # read-only: PEFT rewrites the initial config, we do not
    trained_logits = logits(model)
    model.save_pretrained(str(tmp_path / "theirs"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert_same_files(tmp_path / "ours", tmp_path / "theirs", model)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["r"] == 2 * model.peft_config["default"].r and config["init_lora_weights"] is True
    torch.testing.assert_close(logits(on_original_base(tmp_path / "ours")), trained_logits, atol=1e-4, rtol=1e-4)


def test_keeps_modules_to_save_and_converts_embedding_lora(tmp_path, caplog):
    """PEFT drops modules_to_save (unloadable) and leaves embedding LoRA unconverted; we do neither."""
    model = prepare(tmp_path, dict(target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]))
    with caplog.at_level(logging.WARNING, logger="shardsave"):
        shardsave.save_pretrained(
            model, tmp_path / "ours", path_initial_model_for_weight_conversion=str(tmp_path / "init")
        )
    assert not [
        r for r in caplog.records if r.name == "shardsave"
    ]  # the checks on what is written know that the rank doubled
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.weight" in saved
    assert saved["base_model.model.model.embed_tokens.lora_embedding_A"].shape[0] == 2 * 8
    torch.testing.assert_close(logits(on_original_base(tmp_path / "ours")), logits(model), atol=1e-4, rtol=1e-4)


def test_keeps_bf16(tmp_path):
    model = prepare(tmp_path, dict(target_modules=QV), dtype="bfloat16")
    shardsave.save_pretrained(model, tmp_path / "ours", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    loaded = on_original_base(tmp_path / "ours", dtype="bfloat16")
    torch.testing.assert_close(logits(loaded), logits(model), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "lora,init,match",
    [
        (dict(target_modules=QV, use_dora=True), "pissa", "DoRA"),
        (dict(target_modules=QV, lora_bias=True), True, "lora_bias"),  # PEFT refuses PiSSA with lora_bias itself
        (dict(target_modules=QV, use_rslora=True, rank_pattern={"v_proj": 4}), "pissa", "rsLoRA"),
    ],
)
def test_refuses_what_cannot_be_converted_exactly(lora, init, match, tmp_path):
    model = prepare(tmp_path, lora, init=init)
    with pytest.raises(ValueError, match=match):
        shardsave.save_pretrained(
            model, tmp_path / "o", path_initial_model_for_weight_conversion=str(tmp_path / "init")
        )
    assert not (tmp_path / "o").exists()


def test_initial_adapter_of_another_shape(tmp_path):
    model = prepare(tmp_path, dict(target_modules=QV))
    other = pissa_model(dict(target_modules=["q_proj"], r=4))
    save_initial(other, tmp_path / "other")
    with pytest.raises(ValueError, match="does not match the trained adapter"):
        shardsave.save_pretrained(
            model, tmp_path / "o", path_initial_model_for_weight_conversion=str(tmp_path / "other")
        )
    assert not (tmp_path / "o").exists()


def test_merge_converts_like_save_pretrained(tmp_path, caplog):
    model = prepare(tmp_path, dict(target_modules=QV, modules_to_save=["lm_head"]))
    shardsave.save_pretrained(
        model, tmp_path / "direct", path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    shardsave.save_shards(model, tmp_path / "shards")
    with caplog.at_level(logging.WARNING, logger="shardsave"):
        shardsave.merge_shards(
            tmp_path / "shards", tmp_path / "merged", path_initial_model_for_weight_conversion=tmp_path / "init"
        )
    assert not [r for r in caplog.records if r.name == "shardsave"]  # the checks read the converted config and tensors
    assert snapshot(tmp_path / "merged") == snapshot(tmp_path / "direct")


def test_config_and_tensor_rules():
    assert convert_config_dict({"r": 8, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {}, "alpha_pattern": {}})[
        "lora_alpha"
    ] == pytest.approx(16 * 2**0.5)
    assert convert_config_dict({"r": 8, "lora_alpha": 16, "rank_pattern": {"a": 4}, "alpha_pattern": {"b": 3}}) == {
        "r": 16, "lora_alpha": 32, "rank_pattern": {"a": 8}, "alpha_pattern": {"b": 6}, "init_lora_weights": True,
    }  # fmt: skip
    assert [kind_of(k) for k in ("x.lora_A.weight", "e.lora_embedding_B", "x.lora_B.bias", "lm_head.weight")] == [
        "A", "B", "keep", "keep",
    ]  # fmt: skip
    a, a0 = torch.randn(2, 5), torch.randn(3, 5)
    b, b0 = torch.randn(4, 2), torch.randn(4, 3)
    assert torch.equal(convert_tensor("l.lora_A.weight", a, a0), torch.cat([a, a0]))
    assert torch.equal(convert_tensor("l.lora_B.weight", b, b0), torch.cat([b, -b0], dim=1))


def as_bin(directory):
    """The initial adapter as PEFT writes it with safe_serialization=False."""
    tensors = load_file(directory / "adapter_model.safetensors")
    (directory / "adapter_model.safetensors").unlink()
    torch.save(tensors, directory / "adapter_model.bin")


def test_pickled_initial_adapter_needs_opt_in(tmp_path):
    model = prepare(tmp_path, dict(target_modules=QV))
    shardsave.save_pretrained(model, tmp_path / "ref", path_initial_model_for_weight_conversion=tmp_path / "init")
    as_bin(tmp_path / "init")
    with pytest.raises(ValueError, match="is a pickle, and shardsave does not unpickle files unless asked"):
        shardsave.save_pretrained(model, tmp_path / "o", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "o").exists()
    shardsave.save_pretrained(
        model, tmp_path / "o", path_initial_model_for_weight_conversion=tmp_path / "init", allow_pickle=True
    )
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "ref" / "adapter_model.safetensors"
    ).read_bytes()


def test_opted_in_pickle_is_still_weights_only(tmp_path):
    """A .bin that would run code when unpickled is refused even with allow_pickle=True."""
    model = prepare(tmp_path, dict(target_modules=QV))
    (tmp_path / "init" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "init" / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"not loadable with torch.load\(weights_only=True\)"):
        shardsave.save_pretrained(
            model, tmp_path / "o", path_initial_model_for_weight_conversion=tmp_path / "init", allow_pickle=True
        )
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_corrupt_initial_adapter(tmp_path):
    model = prepare(tmp_path, dict(target_modules=QV))
    path = tmp_path / "init" / "adapter_model.safetensors"
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        shardsave.save_pretrained(model, tmp_path / "o", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "o").exists()


def test_merge_cli_pickled_initial_adapter(tmp_path):
    import subprocess
    import sys

    model = prepare(tmp_path, dict(target_modules=QV))
    shardsave.save_shards(model, tmp_path / "shards")
    as_bin(tmp_path / "init")
    cmd = [sys.executable, "-m", "shardsave.merge", str(tmp_path / "shards"), "-o", str(tmp_path / "m"),
           "--initial-adapter", str(tmp_path / "init"), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--allow-pickle" in proc.stderr, proc.stderr
    assert not (tmp_path / "m").exists()
    proc = subprocess.run([*cmd, "--allow-pickle"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "adapter_model.safetensors").exists()
