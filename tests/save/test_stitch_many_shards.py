"""The merge of a set from more ranks than the process may hold open files: every tensor is spread over all
1100 shard files, merged under a 256-descriptor limit, byte-identical to the merge without a limit."""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import shardsave
from shardsave.formats.shard_set import FORMAT, MANIFEST_NAME, shard_name

WORLD = 1100
LIMIT = 256


def write_set(directory, full: dict[str, torch.Tensor]) -> None:
    """A shard set as `save_shards` lays it out (README, "Shard format"): rank r holds an equal run of every
    tensor."""
    directory.mkdir()
    keys = list(full)
    adapters = {"default": {"config": json.dumps({"r": 8}), "keys": keys}}
    files = []
    for rank in range(WORLD):
        entries, tensors = [], {}
        for key, tensor in full.items():
            per = tensor.numel() // WORLD
            start, stop = rank * per, (rank + 1) * per
            name = f"default/{key}@{start}"
            tensors[name] = tensor.reshape(-1)[start:stop].clone()
            dtype = {torch.float32: "F32", torch.bfloat16: "BF16"}[tensor.dtype]
            entries.append({"tensor": name, "adapter": "default", "key": key, "shape": list(tensor.shape),
                            "dtype": dtype, "start": start, "stop": stop})  # fmt: skip
        metadata = {"format": FORMAT, "run_id": "many", "world_size": str(WORLD), "rank": str(rank),
                    "entries": json.dumps(entries), "adapters": json.dumps(adapters), "card": "card\n"}  # fmt: skip
        path = directory / shard_name(rank, WORLD)
        save_file(tensors, path, metadata=metadata)
        data = path.read_bytes()
        files.append({"rank": rank, "name": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": FORMAT, "run_id": "many", "world_size": WORLD, "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


def _low_descriptor_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


FULL = {
    "base_model.model.q.lora_A.weight": torch.randn(4, WORLD * 3 // 4, generator=torch.Generator().manual_seed(0)),
    "base_model.model.q.lora_B.weight": torch.randn(WORLD, 2, generator=torch.Generator().manual_seed(1)).bfloat16(),
}


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("many") / "shards"
    write_set(directory, FULL)
    return directory


@pytest.mark.parametrize("bin_output", [False, True], ids=["safetensors", "bin"])
def test_merge_more_shards_than_open_files(many_shards, bin_output, tmp_path):
    reference = shardsave.merge_shards(many_shards, tmp_path / "reference", safe_serialization=not bin_output)
    proc = subprocess.run(
        [sys.executable, "-m", "shardsave.merge", many_shards, "-o", tmp_path / "limited", "--no-progress"]
        + (["--bin"] if bin_output else []),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_low_descriptor_limit,
    )
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "limited").iterdir())
    for name in names:
        assert (tmp_path / "limited" / name).read_bytes() == (reference / name).read_bytes(), name
    if bin_output:
        merged = torch.load(tmp_path / "limited" / "adapter_model.bin", weights_only=True)
    else:
        merged = load_file(tmp_path / "limited" / "adapter_model.safetensors")
    for key, tensor in FULL.items():
        assert torch.equal(merged[key], tensor), key
