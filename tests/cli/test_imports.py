"""Each CLI job imports what it needs, and no more: stitching a shard set and `verify` without `--base` import
neither peft nor transformers, `--into` with an adapter folder imports no peft, and no transformers either where
the base's files describe it (`shardsave.formats.hf_base`: an unsharded output of a plain causal LM saved by the
installed transformers; else the base model's class, from transformers, gives the keys and files its
`save_pretrained` writes), and the rescue of a LoRA on a Llama-family base from a DCP checkpoint imports neither
(planned from metadata: shardsave.rescue.fast). Each job runs in a fresh interpreter on tiny inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig
from tiny import base_model, peft_model

import shardsave

ROOT = Path(__file__).resolve().parents[2]
QV = ["q_proj", "v_proj"]

SCRIPT = """
import sys
from shardsave.cli.{cli} import main
code = main(sys.argv[1:])
print("peft" in sys.modules, "transformers" in sys.modules, code, sep="|")
"""


def imported(cli: str, *args) -> tuple[bool, bool]:
    """Whether `python -m shardsave.<cli> ARGS` imported (peft, transformers); it must succeed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(cli=cli), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    peft, transformers, code = proc.stdout.strip().splitlines()[-1].split("|")
    assert code == "0", proc.stderr[-3000:]
    return peft == "True", transformers == "True"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A shard set, the adapter folder, and the base model folder it was trained on."""
    root = tmp_path_factory.mktemp("imports")
    base_model().save_pretrained(root / "base")
    model = peft_model(LoraConfig(target_modules=QV, rank_pattern={"q_proj": 4}))
    model.save_pretrained(root / "adapter")
    shardsave.save_shards(model, root / "shards")
    return root


def test_stitching_shards_imports_neither_peft_nor_transformers(saved, tmp_path):
    assert imported("merge", saved / "shards", "-o", tmp_path / "out", "--no-progress") == (False, False)


def test_verify_without_base_imports_neither_peft_nor_transformers(saved):
    assert imported("verify", saved / "adapter") == (False, False)  # rank_pattern: shardsave's own rule


def test_merge_into_from_an_adapter_folder_imports_no_peft(saved, tmp_path):
    peft, _ = imported("merge", saved / "adapter", "--into", saved / "base", "-o", tmp_path / "merged")
    assert not peft


def test_merge_into_a_plain_base_imports_neither_peft_nor_transformers(saved, tmp_path):
    """A tiny Llama saved by the installed transformers, merged into one file: described from its files."""
    out = tmp_path / "merged"
    assert imported("merge", saved / "adapter", "--into", saved / "base", "-o", out) == (False, False)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_merge_into_a_sharded_output_imports_transformers_but_no_peft(saved, tmp_path):
    """A sharded output follows save_pretrained's key order, which only the class knows."""
    args = ("--into", saved / "base", "-o", tmp_path / "merged", "--max-shard-size", "40KB")
    assert imported("merge", saved / "adapter", *args) == (False, True)


def test_rescue_of_a_dcp_lora_imports_neither_peft_nor_transformers(saved, tmp_path):
    """The common rescue (a LoRA on a Llama, DCP) is planned from metadata alone (shardsave.rescue.fast)."""
    import torch.distributed.checkpoint as dcp

    model = peft_model(LoraConfig(target_modules=QV, r=4))
    folder = tmp_path / "checkpoint-3"
    dcp.save(model.state_dict(), checkpoint_id=str(folder / "model"))
    model.peft_config["default"].save_pretrained(str(folder))
    got = imported("merge", folder, "-o", tmp_path / "out", "--base", saved / "base", "--no-progress")
    assert got == (False, False)
