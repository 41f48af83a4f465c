"""Two gloo ranks, parameters whole on each (DDP): every rank calls, one writes, failures reach all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from multirank import check_ok, run_ranks


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


pytestmark = pytest.mark.multirank


def test_ddp_save_matches_peft_after_training(tmp_path):
    lora = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    check_ok(run_ranks("backend_save", tmp_path, backend="ddp", lora=lora))
    from peft import PeftModel
    from tiny import base_model, logits

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    loaded = PeftModel.from_pretrained(base_model(), str(ours)).eval()
    torch.testing.assert_close(logits(loaded), torch.load(tmp_path / "logits.pt"), atol=1e-5, rtol=1e-4)
    for rel in ("adapter_model.safetensors", "README.md"):
        assert (ours / rel).read_bytes() == (theirs / rel).read_bytes()


# gather_state_dict under DDP (full tensors on rank 0, {} on rank 1): test_multirank_backends.py::test_backend_qv


def test_is_main_process_picks_the_writer(tmp_path):
    results = run_ranks("writer_rank1", tmp_path)
    check_ok(results)
    # every rank returns only after the adapter is published
    assert all(r.result["exists_after_return"] for r in results)


def test_missing_rank_is_named_within_timeout(tmp_path):
    results = run_ranks("only_rank0_calls", tmp_path, timeout=3)
    r0 = results[0]
    assert r0.result["type"] == "MissingRanksError", r0.output[-3000:]
    assert "rank(s) [1]" in r0.error and "Every rank must call" in r0.error
    assert float((tmp_path / "elapsed").read_text()) < 3 + 10
    assert not (tmp_path / "ours").exists()


def test_writer_failure_raises_on_every_rank(tmp_path):
    results = run_ranks("writer_fails", tmp_path)
    assert results[0].result["type"] == "SaveError", results[0].output
    assert "a_file/adapter failed" in results[0].error and "Nothing was published" in results[0].error
    assert results[1].result["type"] == "RemoteError" and "rank 0" in results[1].error
    leftovers = [p.name for p in tmp_path.iterdir() if "shardsave" in p.name]
    assert leftovers == []


def test_two_writers_refused_on_all_ranks(tmp_path):
    results = run_ranks("two_writers", tmp_path)
    for r in results:
        assert r.result["type"] == "ValueError" and "is_main_process is true on rank(s) [0, 1]" in r.error
    assert not (tmp_path / "ours").exists()


def test_different_directories_refused(tmp_path):
    results = run_ranks("mismatched_args", tmp_path)
    for r in results:
        assert r.result["type"] == "ValueError" and "save_directory" in r.error
    assert not any(p.name.startswith("ours") for p in tmp_path.iterdir())


def test_bad_argument_on_one_rank_raises_everywhere(tmp_path):
    results = run_ranks("bad_adapter_on_one_rank", tmp_path)
    assert results[1].result["type"] == "ValueError" and "nope" in results[1].error
    assert results[0].result["type"] == "RemoteError" and "rank 1" in results[0].error


@pytest.mark.parametrize("how", ["full", "unwritable"])
def test_writer_cannot_write(how, tmp_path):
    """Writes failing past 4 KiB on the writer (as on a full disk), or a destination where nothing can be
    created: every rank raises, the previous adapter is kept byte for byte, nothing is left behind."""
    if not Path("/sys").is_dir():
        pytest.skip("needs Linux sysfs for an unwritable destination")
    results = run_ranks("writer_cannot_write", tmp_path, how=how)
    r0, r1 = results
    assert r0.result["type"] == "SaveError" and "Nothing was published" in r0.error, r0.output[-3000:]
    os_errors = ("File too large",) if how == "full" else ("Operation not permitted", "Read-only", "Permission denied")
    assert any(e in r0.error for e in os_errors), r0.error
    assert r1.result["type"] == "RemoteError" and "failed on rank 0" in r1.error and "Nothing was published" in r1.error
    if how == "full":
        assert snapshot(tmp_path / "adapter") == snapshot(tmp_path / "previous")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_different_adapters_refused(tmp_path):
    results = run_ranks("different_adapters", tmp_path)
    for r in results:
        assert r.result["type"] == "ValueError" and "Ranks disagree" in r.error and "selected_adapters" in r.error
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("op", ["save_pretrained", "save_shards", "gather_state_dict"])
def test_only_rank0_calls_any_entry_point(op, tmp_path):
    results = run_ranks("only_rank0_calls", tmp_path, timeout=3, op=op)
    r0 = results[0]
    assert r0.result["type"] == "MissingRanksError", r0.output[-3000:]
    assert "rank(s) [1]" in r0.error and f"shardsave.{op}(...)" in r0.error
    assert float((tmp_path / "elapsed").read_text()) < 3 + 10
    assert not (tmp_path / "ours").exists()


def test_per_node_paths_are_decided_by_the_writer(tmp_path):
    """Ranks with other working directories and a base config.json only on the writer's node: the writer
    resolves the relative destination and decides the embeddings (resized vocabulary: saved, as PEFT does);
    no "ranks disagree"; the shards go to the writer's directory and merge to the same bytes."""
    import subprocess
    import sys

    from safetensors import safe_open

    check_ok(run_ranks("per_node_paths", tmp_path, backend="fsdp2"))
    node0 = tmp_path / "node0"
    assert not (tmp_path / "node1" / "adapter").exists() and not (tmp_path / "node1" / "shards").exists()
    with safe_open(node0 / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert any(k.endswith("embed_tokens.weight") for k in f.keys())
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (node0 / "adapter" / name).read_bytes() == (node0 / "theirs" / name).read_bytes(), name
    proc = subprocess.run([sys.executable, "-m", "shardsave.merge", str(node0 / "shards"), "-o", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    merged = (tmp_path / "m" / "adapter_model.safetensors").read_bytes()
    assert merged == (node0 / "adapter" / "adapter_model.safetensors").read_bytes()


def test_unshared_directory_is_named(tmp_path):
    """save_shards needs a filesystem every rank sees: a rank with its own view of the directory (a private
    mount, as on a node without the shared filesystem) raises naming the directory; no manifest is written."""
    results = run_ranks("unshared_shards", tmp_path)
    if results[0].result.get("skipped"):
        pytest.skip(results[0].result["skipped"])
    assert results[1].result.get("type") == "SaveError", results[1].output[-3000:]
    assert "cannot see the files rank 0 prepared" in results[1].error and "shared by every rank" in results[1].error
    assert results[0].result.get("type") == "RemoteError", results[0].output[-3000:]
    assert not (tmp_path / "private" / "shards" / "manifest.json").exists()


def test_node_local_shards_merge_from_several_folders(tmp_path):
    """save_shards(shared_filesystem=False) with rank 1 on its own disk (a private mount): each node's folder holds
    its ranks' files, rank 0's the manifest; `python -m shardsave.merge` of both folders writes what
    save_pretrained wrote; either folder alone is refused, naming the missing file."""
    import subprocess
    import sys

    results = run_ranks("unshared_shards", tmp_path, node_local=True)
    if results[0].result.get("skipped"):
        pytest.skip(results[0].result["skipped"])
    check_ok(results)
    node0, node1 = tmp_path / "private" / "shards", tmp_path / "node1"
    assert (node0 / "manifest.json").exists() and not (node1 / "manifest.json").exists()
    cli = [sys.executable, "-m", "shardsave.merge", "--no-progress"]
    merge = cli + [str(node0), str(node1), "-o", str(tmp_path / "merged")]
    proc = subprocess.run(merge, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("adapter_model.safetensors", "README.md"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    for alone in (node0, node1):
        proc = subprocess.run(cli + [str(alone), "-o", str(tmp_path / "alone")], capture_output=True, text=True)
        assert proc.returncode == 2 and "missing" in proc.stderr and not (tmp_path / "alone").exists(), proc.stderr


def test_writer_out_of_memory_is_agreed_before_any_tensor_moves(tmp_path):
    """The writer allocates its buffers while planning: running out of memory there fails every rank at the
    agreement (the writer its own error, the others RemoteError naming it), and no rank sends anything."""
    import json

    results = run_ranks("writer_out_of_memory", tmp_path)
    assert results[0].result.get("type") == "OutOfMemoryError", results[0].output[-3000:]
    assert results[1].result.get("type") == "RemoteError" and "could not allocate" in results[1].error
    for rank in (0, 1):
        assert json.loads((tmp_path / f"comm-{rank}.json").read_text()) == []
    assert not (tmp_path / "adapter").exists()
