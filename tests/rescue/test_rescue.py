"""The rescue (shardsave.rescue, through python -m shardsave.merge) on single-process DCP saves: several adapters,
`.bin`, config discovery, and every way a source can be wrong. The multi-rank DeepSpeed and FSDP2 checkpoints
are in test_deepspeed_source.py and test_dcp_source.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from peft import LoraConfig
from rescue_checks import rescue, same_files
from tiny import base_model, llama_config, peft_model

import shardsave
from shardsave.rescue.checkpoint import RescueError, detect_source, rescue_adapter

OTHER = LoraConfig(target_modules=["k_proj"], r=2, lora_alpha=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A Trainer-style checkpoint folder: a DCP save of a two-adapter model, its adapter configs and card as
    shardsave.save_pretrained writes them (`reference/`), the base model's config (`base/`)."""
    root = tmp_path_factory.mktemp("rescue")
    model = peft_model(
        LoraConfig(target_modules=["q_proj", "v_proj"], r=4, modules_to_save=["lm_head"]), adapters=[("other", OTHER)]
    )
    folder = root / "checkpoint-7"
    dcp.save({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, checkpoint_id=str(folder / "model"))
    shardsave.save_pretrained(model, folder / "reference")
    shardsave.save_pretrained(model, root / "reference_bin", safe_serialization=False)
    for name in ("default", "other"):
        model.peft_config[name].save_pretrained(str(folder / ("" if name == "default" else name)))
    llama_config().save_pretrained(str(root / "base"))
    return folder


def test_several_adapters_and_bin(checkpoint, tmp_path):
    base = checkpoint.parent / "base"
    code, err = rescue(checkpoint, "-o", tmp_path / "out", "--base", base)
    assert code == 0, err
    same_files(checkpoint / "reference", tmp_path / "out")  # default at the root, `other/` beside it
    code, err = rescue(checkpoint / "model", "-o", tmp_path / "bin", "--base", base, "--bin")
    assert code == 0, err
    for name in ("adapter_model.bin", "other/adapter_model.bin"):
        got = torch.load(tmp_path / "bin" / name, weights_only=True)
        want = torch.load(checkpoint.parent / "reference_bin" / name, weights_only=True)
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_cli_in_a_subprocess_says_what_it_read(checkpoint, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "shardsave.merge", str(checkpoint), "-o", str(tmp_path / "out"),
         "--base", str(checkpoint.parent / "base"), "--dtype", "bfloat16"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "torch.distributed.checkpoint (DCP) folder (model)" in proc.stdout
    assert "leaked" not in proc.stderr  # the CLI's gc.freeze is undone before exit (nanobind counts leaks there)
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(tmp_path / "out" / "adapter_model.safetensors").values()} == {torch.bfloat16}


def test_config_file_and_base_from_the_config(checkpoint, tmp_path):
    """--adapter-config as one file; the base found through the config's base_model_name_or_path."""
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(checkpoint.parent / "base")
    (tmp_path / "my.json").write_text(json.dumps(config))
    out = rescue_adapter(checkpoint / "model", tmp_path / "out", adapter_config=tmp_path / "my.json")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(checkpoint.parent / "base")
    assert not (out / "other").exists()  # one config given: one adapter written (the other is warned about)


def test_sources_recognised_or_explained(checkpoint, tmp_path):
    assert detect_source(checkpoint).kind == "dcp" and detect_source(checkpoint).path == checkpoint / "model"
    runs = tmp_path / "outputs"
    for n in (5, 40, 300):
        (runs / f"checkpoint-{n}").mkdir(parents=True)
    adapter = tmp_path / "adapter"
    shardsave.save_pretrained(peft_model(OTHER), adapter)
    (tmp_path / "empty").mkdir()
    (tmp_path / "two" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").mkdir()
    (tmp_path / "two" / "a" / ".metadata").write_bytes(b"")
    (tmp_path / "two" / "b" / ".metadata").write_bytes(b"")
    cases = [
        (tmp_path / "missing", "does not exist"),
        (adapter / "adapter_config.json", "a file; pass the folder"),
        (adapter, "python -m shardsave.verify"),
        (runs, "checkpoint-300 (the newest)"),
        (tmp_path / "empty", "empty"),
        (tmp_path / "two", "several DCP checkpoints (['a', 'b'])"),
    ]
    for path, words in cases:
        with pytest.raises(RescueError, match=None) as caught:
            detect_source(path)
        assert words in str(caught.value), (path, str(caught.value))
    with pytest.raises(RescueError, match="--tag 'x' picks a DeepSpeed"):
        detect_source(checkpoint, tag="x")


def test_bad_inputs_exit_2_and_write_nothing(checkpoint, tmp_path):
    base = checkpoint.parent / "base"
    full = tmp_path / "full"
    dcp.save(base_model().state_dict(), checkpoint_id=str(full))  # a full fine-tune: no adapter in it
    (full / "adapter_config.json").write_text((checkpoint / "adapter_config.json").read_text())
    no_base = tmp_path / "no_base"
    no_base.mkdir()
    (no_base / "adapter_config.json").write_text((checkpoint / "adapter_config.json").read_text())
    not_lora = tmp_path / "not_lora"
    not_lora.mkdir()
    (not_lora / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"]}))
    other_base = tmp_path / "other_base"
    llama_config().save_pretrained(str(other_base))
    wider = json.loads((other_base / "config.json").read_text()) | {"hidden_size": 64, "intermediate_size": 128}
    (other_base / "config.json").write_text(json.dumps(wider))
    out = tmp_path / "out"
    cases = [
        ((full, "--base", base), "holds no adapter tensor"),
        ((checkpoint / "model", "--adapter-config", no_base), "pass --base"),
        ((checkpoint / "model", "--adapter-config", not_lora, "--base", base), "of type IA3"),
        ((checkpoint, "--base", tmp_path / "nowhere"), "nor a model in the local Hugging Face cache"),
        ((checkpoint, "--base", other_base), "is [4, 32] there, but [4, 64] for this config (r=4) on this base"),
        ((checkpoint, "--base", base, "--dtype", "int8"), "invalid choice"),
    ]
    for args, words in cases:
        code, err = rescue(*args, "-o", out) if "--dtype" not in args else _argparse_error(*args, "-o", out)
        assert code == 2 and words in err, (args, err)
        assert not out.exists()
    out.mkdir()
    code, err = rescue(checkpoint, "-o", out, "--base", base)
    assert code == 2 and "already exists" in err and not any(out.iterdir())


def _argparse_error(*args) -> tuple[int, str]:
    try:
        return rescue(*args)
    except SystemExit as exc:  # argparse exits 2 itself, its message on stderr
        return int(exc.code), "invalid choice"


def test_resized_vocabulary_saves_the_embeddings(tmp_path):
    """A base whose vocabulary was resized for fine-tuning: save_pretrained saves the embedding layers (PEFT's
    "auto"); the rescue sees the resize in the checkpoint and does the same, from the checkpoint's frozen copy."""
    from peft import get_peft_model

    base_dir = tmp_path / "base"
    llama_config().save_pretrained(str(base_dir))
    model = base_model()
    model.name_or_path = model.config._name_or_path = str(base_dir)
    model.resize_token_embeddings(100)
    model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    shardsave.save_pretrained(model, tmp_path / "reference")
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "ckpt"))
    model.peft_config["default"].save_pretrained(str(tmp_path / "ckpt"))
    out = rescue_adapter(tmp_path / "ckpt", tmp_path / "out")
    same_files(tmp_path / "reference", out)
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.get_slice("base_model.model.model.embed_tokens.weight").get_shape() == [100, 32]


@pytest.mark.multirank
def test_trainer_zero3_checkpoint_rescued_in_place(tmp_path):
    """The user's story end to end: Trainer + DeepSpeed ZeRO-3 on 2 gloo ranks writes checkpoint-2/; its adapter
    file is then broken as in trl#4416 (every tensor saved with shape (0,)). verify says so; the merge rewrites
    the adapter files in place from the ZeRO-3 checkpoint beside them, byte for byte what
    shardsave.save_pretrained wrote from the live model, and touches nothing else in the folder."""
    from multirank import check_ok, run_ranks
    from safetensors.torch import load_file, save_file

    from shardsave.cli.verify import main as verify_main

    results = run_ranks("trainer_zero3", tmp_path, limit=500)
    check_ok(results)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    adapter = checkpoint / "adapter_model.safetensors"
    save_file({k: torch.empty(0) for k in load_file(adapter)}, str(adapter), metadata={"format": "pt"})
    assert verify_main([str(checkpoint)]) == 1
    untouched = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in checkpoint.rglob("*") if p.is_file()}
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        untouched.pop(checkpoint / name)
    code, err = rescue(checkpoint, "-o", checkpoint, "--overwrite", "--base", tmp_path / "base")
    assert code == 0, err
    assert verify_main([str(checkpoint)]) == 0
    assert adapter.read_bytes() == (tmp_path / "reference" / "adapter_model.safetensors").read_bytes()
    assert untouched == {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in untouched}


def test_names_aligned_whatever_holds_the_peft_model():
    """A pure check of the name alignment: the PeftModel's own names, the inner model's (saved without
    `base_model.model.`), and a model holding the PeftModel (TRL's value head: `pretrained_model.` before every
    name, and tensors of its own)."""
    from shardsave.rescue.checkpoint import align_names

    needed = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
        "base_model.model.lm_head.modules_to_save.default.weight",
    ]
    inner = {n.removeprefix("base_model.model."): 0 for n in needed} | {"model.embed_tokens.weight": 0}
    outer = {f"pretrained_model.{n}": 0 for n in needed} | {"v_head.summary.weight": 0, "v_head.summary.bias": 0}
    assert align_names(needed, {n: 0 for n in needed}) == {n: n for n in needed}
    assert align_names(needed, inner) == {n: n.removeprefix("base_model.model.") for n in needed}
    assert align_names(needed, outer) == {n: f"pretrained_model.{n}" for n in needed}
    assert align_names(needed, {"model.embed_tokens.weight": 0}) == {}
