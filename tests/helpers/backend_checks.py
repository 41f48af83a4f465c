"""Checks shared by the multi-rank save tests: the file equals PEFT's, only adapter bytes move, shards + merge."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from multirank import check_ok, run_ranks
from peft import PeftModel
from tiny import assert_same_files, base_model, files_under, logits

QV = {"target_modules": ["q_proj", "v_proj"]}


def check_backend(tmp_path, backend, lora=QV, model=None, dtype=None, **params):
    model_kwargs = dict(model or {}, **({"dtype": dtype} if dtype else {}))
    results = run_ranks("backend_save", tmp_path, backend=backend, lora=lora, model=model_kwargs, **params)
    check_ok(results)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(theirs))
    fake = type("M", (), {"peft_config": {"default": config}})()
    assert_same_files(ours, theirs, fake)
    base = base_model(**(model or {}))
    if dtype:
        base.to(getattr(torch, dtype))
    loaded = PeftModel.from_pretrained(base, str(ours), autocast_adapter_dtype=False).eval()
    tolerance = 2e-2 if dtype else 1e-4
    torch.testing.assert_close(logits(loaded), torch.load(tmp_path / "logits.pt"), atol=tolerance, rtol=tolerance)
    return results


def check_gathered(tmp_path):
    gathered = torch.load(tmp_path / "gathered.pt")
    full = torch.load(tmp_path / "full_state.pt")
    assert gathered and all("lora_" in k or ".modules_to_save." in k for k in gathered), sorted(gathered)[:4]
    for name, tensor in gathered.items():
        assert torch.equal(tensor, full[name]), name


def check_only_adapter_bytes_move(tmp_path, backend, world_size: int = 2, base_ratio: int = 10) -> dict[int, int]:
    """The save only sends point to point to the writer (a few rounds), at most the bytes of the adapter;
    frozen base weights are never sent (the base model here is more than `base_ratio` x the adapter).
    Returns the bytes each rank sent."""
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "ours" / "adapter_model.safetensors").values()
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter)
    base_bytes = sum(v.numel() * v.element_size() for v in torch.load(tmp_path / "full_state.pt").values())
    assert base_bytes > base_ratio * adapter_bytes
    sent_by = {}
    for rank in range(world_size):
        calls = json.loads((tmp_path / f"comm-{rank}.json").read_text())
        if calls[:1] == [["all_reduce", 4]]:  # a process's first gather warms the world group (collect/sharded.py)
            calls = calls[1:]
        assert all(name == "batch_isend_irecv" for name, _ in calls), calls
        sent = sum(nbytes for _, nbytes in calls)
        assert sent <= adapter_bytes, (sent, adapter_bytes)
        if rank == 0:  # the writer sends nothing
            assert sent == 0, calls
        if backend in ("ddp", "zero1", "zero2"):
            assert calls == []
        sent_by[rank] = sent
    return sent_by


def check_shards_merge(tmp_path, world_size: int = 2):
    """save_shards wrote a set that merges (CLI, as a subprocess) into the same bytes, with no collective."""
    proc = subprocess.run(
        [sys.executable, "-m", "shardsave.merge", str(tmp_path / "shards"), "-o", str(tmp_path / "merged")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for rel in files_under(tmp_path / "ours"):
        assert (tmp_path / "merged" / rel).read_bytes() == (tmp_path / "ours" / rel).read_bytes(), rel
    for rank in range(world_size):
        assert json.loads((tmp_path / f"shard-comm-{rank}.json").read_text()) == []
    sizes = [p.stat().st_size for p in sorted((tmp_path / "shards").glob("shard-*.safetensors"))]
    assert len(sizes) == world_size and all(size > 0 for size in sizes)
