"""The rescue from the FSDP checkpoints Trainer writes: accelerate's own `save_fsdp_model(..., adapter_only=True)`
on 2 gloo ranks (scenario `accelerate_fsdp_save` in scenarios_rescue.py), under FSDP2 (PEFT's key format as DCP,
DTensor rank files, full file) and FSDP1 (modules_to_save alone: the LoRA weights are not there)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from rescue_checks import rescue, same_files

from shardsave.cli.verify import main as verify_main
from shardsave.formats.dcp import dcp_tensors
from shardsave.rescue.checkpoint import key_format


def _checkpoint_run(tmp_path, version: int):
    from multirank import check_ok, run_ranks

    check_ok(run_ranks("accelerate_fsdp_save", tmp_path, fsdp_version=version, limit=400))
    return tmp_path / "run" / "checkpoint-3", tmp_path / "base"


@pytest.mark.multirank
def test_fsdp2_checkpoints_rescued_as_saved_from_the_live_model(tmp_path, caplog):
    """Every FSDP2 file accelerate writes gives, byte for byte, what shardsave.save_pretrained wrote from the live
    model, and the README's recipe for a broken checkpoint-N/ works on Trainer's layout as written."""
    from safetensors.torch import load_file, save_file

    checkpoint, base = _checkpoint_run(tmp_path, 2)
    names = list(dcp_tensors(checkpoint / "pytorch_model_fsdp_0"))
    assert len(names) == 9 and key_format(names) == "peft"  # PEFT's keys: no adapter name (what broke on main)
    for source in ("per_rank", "full"):
        out = tmp_path / f"out-{source}"
        with caplog.at_level(logging.INFO, logger="shardsave"):
            code, err = rescue(tmp_path / source, "-o", out, "--base", base)
        assert code == 0, (source, err)
        same_files(tmp_path / "reference", out)
    assert "rescued as adapter 'default'" in caplog.text  # the rank files: PEFT's keys, as DTensors
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("adapter_config.json", "pytorch_model_fsdp_0_rank0.bin"):
        (partial / name).write_bytes((tmp_path / "per_rank" / name).read_bytes())
    code, err = rescue(partial, "-o", tmp_path / "out-partial", "--base", base)
    assert code == 2 and "only 1 rank files are here (ranks 0..0); copy every rank's file" in err, err
    # the recipe: verify finds the broken adapter, the merge rewrites it in place from pytorch_model_fsdp_0/
    adapter = checkpoint / "adapter_model.safetensors"
    save_file({k: torch.empty(0) for k in load_file(adapter)}, str(adapter), metadata={"format": "pt"})
    untouched = {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file() and p.parent != checkpoint}
    assert verify_main([str(checkpoint)]) == 1
    code, err = rescue(checkpoint, "-o", checkpoint, "--overwrite")  # as written: the base named by the config
    assert code == 0, err
    assert verify_main([str(checkpoint)]) == 0
    assert adapter.read_bytes() == (tmp_path / "reference" / "adapter_model.safetensors").read_bytes()
    assert untouched == {p: p.read_bytes() for p in untouched}  # DCP, optimizer and shards untouched


@pytest.mark.multirank
def test_fsdp1_checkpoint_lacks_lora_and_says_so(tmp_path, capsys):
    """Under FSDP1, accelerate's adapter-only save holds the modules_to_save head alone: the rescue and verify say
    what is missing and why, and point to the adapter ShardSaveCallback wrote (which is the live model's)."""
    checkpoint, base = _checkpoint_run(tmp_path, 1)
    names = list(dcp_tensors(checkpoint / "pytorch_model_fsdp_0"))
    assert names == ["model.base_model.model.lm_head.weight"] and key_format(names) is None
    out = tmp_path / "out"
    code, err = rescue(checkpoint, "-o", out, "--base", base)
    assert code == 2 and not out.exists(), err
    for words in (
        "pytorch_model_fsdp_0: holds 1 of the adapter's 9 tensors",
        "none of its 8 LoRA tensors (e.g. ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'",
        "passes the FSDP1 wrapper to PEFT's get_peft_model_state_dict",
        f"The adapter file {checkpoint / 'adapter_model.safetensors'} is what shardsave's ShardSaveCallback",
        "finds it sound; use it as it is",
        f"python -m shardsave.merge {checkpoint / 'adapter_shards'} -o OUT",
    ):
        assert words in err, (words, err)
    assert "full fine-tune" not in err
    # what the error points to is the live model's adapter
    reference = tmp_path / "reference" / "adapter_model.safetensors"
    assert (checkpoint / "adapter_model.safetensors").read_bytes() == reference.read_bytes()
    capsys.readouterr()
    assert verify_main([str(checkpoint)]) == 0  # the adapter there is sound; the checkpoint's gap is a note
    printed = capsys.readouterr().out
    assert "note:" in printed and "no LoRA tensor of its target_modules" in printed, printed
    assert "get_peft_model_state_dict" in printed and "finds it sound" in printed, printed
    assert verify_main([str(checkpoint), "--json"]) == 0
    assert "get_peft_model_state_dict" in json.loads(capsys.readouterr().out)["notes"][0]
    # use_dcp=False: FSDP1's rank files are ShardedTensor pickles, refused unread, with the same diagnosis
    code, err = rescue(tmp_path / "per_rank", "-o", out, "--base", base)
    assert code == 2 and not out.exists(), err
    assert "holds FSDP1 ShardedTensors" in err and "get_peft_model_state_dict" in err, err
    assert "No adapter ShardSaveCallback wrote is in" in err, err
    # a LoRA without modules_to_save: the checkpoint holds no tensor (not "a full fine-tune")
    code, err = rescue(tmp_path / "lora_only", "-o", out, "--base", base)
    assert code == 2 and "holds no tensor at all: none of its 8 LoRA tensors" in err, err


@pytest.mark.multirank
def test_trainer_fsdp2_checkpoint_rescued(tmp_path):
    """transformers.Trainer itself under FSDP2 on 2 gloo ranks: its checkpoint-2/ holds accelerate's FSDP
    checkpoint and no adapter file or config; the rescue asks for the config, saying why, and with it writes what
    shardsave.save_pretrained wrote from the live model."""
    from multirank import check_ok, run_ranks

    results = run_ranks("trainer_fsdp", tmp_path, limit=500)
    check_ok(results)
    assert results[0].result["fsdp"]
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert not list(checkpoint.glob("adapter_*"))  # Trainer's save_model writes nothing here under SHARDED
    out = tmp_path / "out"
    code, err = rescue(checkpoint, "-o", out)
    assert code == 2 and "Trainer writes no adapter file and no config into checkpoint-N/" in err, err
    code, err = rescue(checkpoint, "-o", out, "--adapter-config", tmp_path / "reference")
    assert code == 0, err
    same_files(tmp_path / "reference", out)


def test_fsdp_file_that_would_run_code_is_refused_unrun(tmp_path):
    """A pytorch_model_fsdp.bin whose pickle names a function is refused by torch.load(weights_only=True): exit 2
    naming the file; nothing is called."""
    import os

    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    marker = tmp_path / "ran"
    torch.save({"base_model.model.lm_head.weight": torch.ones(2), "x": (os.mkdir, str(marker))},
               folder / "pytorch_model_fsdp.bin")  # fmt: skip
    code, err = rescue(folder, "-o", tmp_path / "out")
    assert code == 2 and "pytorch_model_fsdp.bin: not readable with torch.load(weights_only=True)" in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_key_format_rule():
    """A pure check of which names are PEFT's saved keys and which the PeftModel's parameter names."""
    model = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.lm_head.modules_to_save.default.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A.default",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight",
    ]
    peft = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
        "base_model.model.model.embed_tokens.lora_embedding_B",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        "base_model.model.lm_head.weight",
    ]
    assert all(key_format([n]) == "model" for n in model)
    assert all(key_format([n]) == "peft" for n in peft[:-1])
    assert key_format(peft) == "peft" and key_format(model + peft) == "model"
    assert key_format(["base_model.model.lm_head.weight", "model.embed_tokens.weight"]) is None
    # an adapter named like a leaf keeps its name segment
    assert key_format(["m.q_proj.lora_A.weight.weight"]) == "model"
