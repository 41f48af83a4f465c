"""Multi-rank scenarios of a rank SIGKILLed or stuck at each point of a save (tests/ranks/test_faults.py), and
the fresh job that saves again afterwards."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from kill_points import install_kill, kill_self
from scenario_tools import lora_model
from workers import scenario

import shardsave


@scenario
def killed_mid_save(rank, world, out: Path, params):
    """A complete save, then the weights change and one rank is SIGKILLed at `point` of a second save."""
    from backends import wrap

    model = lora_model(params)
    wrapped, _ = wrap(model, "fsdp2")
    op, writer, timeout = params["op"], params.get("writer", 0), params["timeout"]

    def save():
        if op == "save_pretrained":
            shardsave.save_pretrained(wrapped, out / "adapter", is_main_process=(rank == writer), timeout=timeout)
        else:
            shardsave.save_shards(wrapped, out / "shards", timeout=timeout)

    save()
    dist.barrier()
    if rank == 0:
        shutil.copytree(out / ("adapter" if op == "save_pretrained" else "shards"), out / "previous")
    dist.barrier()
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(1.0)
    if rank == params["victim"]:
        if params["point"] == "start":
            kill_self()
        install_kill(params["point"], stall=timeout + 4)
        if params["point"] == "hang_gather":
            save()  # raises once the writer has given up and left
            return {}
    start = time.monotonic()
    try:
        save()
    finally:
        (out / f"elapsed-{rank}").write_text(str(time.monotonic() - start))
    return {}


@scenario
def plain_save(rank, world, out: Path, params):
    """A fresh job saving into the same places (the re-run after a failure)."""
    from backends import wrap

    wrapped, _ = wrap(lora_model(params), "fsdp2")
    if params["op"] == "save_pretrained":
        shardsave.save_pretrained(wrapped, out / "adapter")
    else:
        shardsave.save_shards(wrapped, out / "shards")
    return {}
