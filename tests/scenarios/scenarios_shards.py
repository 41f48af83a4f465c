"""Multi-rank scenarios of `shardsave.save_shards` where the ranks do not share a filesystem
(tests/save/test_multirank_local.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
from scenario_tools import lora_model
from workers import scenario

import shardsave


def _private_mount(path: Path) -> bool:
    """Give this process its own empty view of `path` (a tmpfs in a new mount namespace), as a rank on another
    node without a shared filesystem would have; False where the kernel refuses."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ms_rec, ms_private, clone_newns = 0x4000, 1 << 18, 0x00020000
    return (
        libc.unshare(clone_newns) == 0
        and libc.mount(b"none", b"/", None, ms_rec | ms_private, None) == 0
        and libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", 0, None) == 0
    )


@scenario
def unshared_shards(rank, world, out: Path, params):
    """save_shards where rank 1 does not see rank 0's filesystem under the shard directory."""
    from backends import wrap

    private = out / "private"
    private.mkdir(exist_ok=True)
    mounted = _private_mount(private) if rank == 1 else True
    ok = [None] * world
    dist.all_gather_object(ok, mounted)
    if not all(ok):
        return {"skipped": "mount namespaces are not available here"}
    wrapped, _ = wrap(lora_model(params), "fsdp2")
    if not params.get("node_local"):
        shardsave.save_shards(wrapped, private / "shards", timeout=30)
        return {}
    # node-local disks: each "node" writes its folder, rank 1's is copied back as a user would
    shardsave.save_shards(wrapped, private / "shards", timeout=30, shared_filesystem=False)
    shardsave.save_pretrained(wrapped, out / "reference", timeout=30)
    if rank == 1:
        shutil.copytree(private / "shards", out / "node1")
    return {}
