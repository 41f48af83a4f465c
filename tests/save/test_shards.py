"""save_shards + merge give what save_pretrained gives, in one process and on 2 ranks per backend; every
bad shard set is refused with a message naming the file, and nothing is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from multirank import check_ok, run_ranks
from peft import LoraConfig
from tiny import assert_same_files, files_under, peft_model

import shardsave
from shardsave.save.stitch import ShardSetError

QV = ["q_proj", "v_proj"]


def merge_cli(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "shardsave.merge", *map(str, args), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=QV, modules_to_save=["lm_head"]),
        dict(target_modules=["embed_tokens", "q_proj"], use_dora=True),
        dict(target_modules=QV, trainable_token_indices=[2, 4]),
    ],
)
def test_single_process_shards_merge_to_save_pretrained(lora, tmp_path):
    model = peft_model(LoraConfig(**lora), adapters=[("other", LoraConfig(target_modules=["k_proj"]))])
    shardsave.save_pretrained(model, tmp_path / "direct")
    shardsave.save_shards(model, tmp_path / "shards")
    out = shardsave.merge_shards(tmp_path / "shards", tmp_path / "merged")
    assert files_under(out) == files_under(tmp_path / "direct")
    for rel in files_under(out):
        assert (out / rel).read_bytes() == (tmp_path / "direct" / rel).read_bytes(), rel


def test_bin_output(tmp_path):
    model = peft_model(LoraConfig(target_modules=QV))
    shardsave.save_pretrained(model, tmp_path / "direct", safe_serialization=False)
    shardsave.save_shards(model, tmp_path / "shards")
    merge_cli(tmp_path / "shards", "-o", tmp_path / "merged", "--bin")
    assert_same_files(tmp_path / "merged", tmp_path / "direct", model)


def test_cli_default_output_next_to_shards(tmp_path):
    shardsave.save_shards(peft_model(LoraConfig(target_modules=QV)), tmp_path / "shards")
    proc = merge_cli(tmp_path / "shards")
    assert str(tmp_path / "shards-merged") in proc.stdout
    assert (tmp_path / "shards-merged" / "adapter_model.safetensors").exists()


def test_cli_help_documents_options():
    out = merge_cli("--help").stdout
    for option in ("-o", "--initial-adapter", "--bin", "--overwrite", "Exit status"):
        assert option in out


# multi-rank save_shards + merge per backend: tests/save/test_multirank_backends.py::test_backend_qv


# -- bad shard sets ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    check_ok(run_ranks("backend_save", root, backend="fsdp2", shards=True))
    return root / "shards"


@pytest.fixture
def shards(two_rank_set, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(two_rank_set, copy)
    return copy


def refused(shards, tmp_path, match, *extra):
    out = tmp_path / "out"
    proc = merge_cli(shards, "-o", out, *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    assert match in proc.stderr, proc.stderr
    assert not out.exists() or extra
    assert not [p for p in tmp_path.iterdir() if "shardsave-tmp" in p.name]
    with pytest.raises(ShardSetError):
        shardsave.merge_shards(shards, out, overwrite="--overwrite" in extra)
    return proc.stderr


def test_good_set_merges(shards, tmp_path):
    merge_cli(shards, "-o", tmp_path / "out")


def test_missing_rank(shards, tmp_path):
    (shards / "shard-00001-of-00002.safetensors").unlink()
    assert "shard-00001-of-00002.safetensors: missing" in refused(shards, tmp_path, "missing")


def test_missing_manifest(shards, tmp_path):
    (shards / "manifest.json").unlink()
    refused(shards, tmp_path, "manifest.json: missing")


def test_truncated_file(shards, tmp_path):
    path = shards / "shard-00000-of-00002.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    refused(shards, tmp_path, "truncated")


def test_modified_data_same_size(shards, tmp_path):
    """A flipped byte in the tensor data: only the checksum can tell; checked while the output is being
    written, and nothing is published."""
    path = shards / "shard-00001-of-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    refused(shards, tmp_path, "checksum differs from the manifest")


def test_corrupt_header(shards, tmp_path):
    path = shards / "shard-00000-of-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))
    manifest = json.loads((shards / "manifest.json").read_text())
    for f in manifest["files"]:  # a consistent manifest, so the header itself is what fails
        if f["name"] == path.name:
            f["sha256"] = shardsave.save.shards.sha256_of(path)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    refused(shards, tmp_path, "corrupt")


def test_foreign_file(shards, tmp_path):
    shutil.copy(shards / "shard-00000-of-00002.safetensors", shards / "shard-00002-of-00003.safetensors")
    refused(shards, tmp_path, "shard-00002-of-00003.safetensors: a shard file that the manifest")


def test_cli_output_is_a_file(shards, tmp_path):
    (tmp_path / "out").write_text("keep me")
    proc = merge_cli(shards, "-o", tmp_path / "out", "--overwrite", check=False)
    assert proc.returncode == 2 and "should be a directory, not a file" in proc.stderr, proc.stderr
    assert (tmp_path / "out").read_text() == "keep me"


def test_cli_unwritable_output(shards, tmp_path):
    """Writing fails (nothing can be created under sysfs, even as root): exit 1, a message, nothing published."""
    out = Path(f"/sys/shardsave-test-{tmp_path.name}/merged")
    proc = merge_cli(shards, "-o", out, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "writing the adapter failed" in proc.stderr and "nothing was published" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_pickled_shard_is_never_loaded(shards, tmp_path):
    import torch

    torch.save({"x": torch.zeros(2)}, shards / "shard-00002-of-00003.bin")
    refused(shards, tmp_path, "a pickle file among the shards")


def test_two_runs_mixed(shards, tmp_path):
    other = tmp_path / "other"
    shardsave.save_shards(peft_model(LoraConfig(target_modules=QV)), other)  # a 1-rank run
    manifest = json.loads((shards / "manifest.json").read_text())
    single = json.loads((other / "manifest.json").read_text())
    manifest["run_id"] = single["run_id"]  # a manifest from another run over these files
    (shards / "manifest.json").write_text(json.dumps(manifest))
    refused(shards, tmp_path, "two runs are mixed")


def test_other_world_size(shards, tmp_path):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["world_size"] = 3
    (shards / "manifest.json").write_text(json.dumps(manifest))
    refused(shards, tmp_path, "missing rank(s) [2]")


def test_existing_output_needs_overwrite(shards, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    proc = merge_cli(shards, "-o", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    merge_cli(shards, "-o", tmp_path / "out", "--overwrite")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_progress_bar_when_asked(tmp_path, capsys):
    shardsave.save_shards(peft_model(LoraConfig(target_modules=QV)), tmp_path / "shards")
    shardsave.merge_shards(tmp_path / "shards", tmp_path / "out", progress=True)
    assert "merging" in capsys.readouterr().err
