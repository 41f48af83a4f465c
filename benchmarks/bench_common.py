"""What the rescue and load benchmarks share: the base sizes, the Llama + LoRA model built from a config, the
kernel's peak-memory counters, and the environment of their child processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (name, Llama shape and LoRA rank): rank x hidden is the same in each pair, so the adapters are the same size.
BASES = {
    "default": [
        ("large", dict(hidden=1024, layers=12, vocab=32000, rank=16)),
        ("small", dict(hidden=512, layers=12, vocab=16000, rank=32)),
    ],
    # ~0.94B: where zero_to_fp32 (which reads the whole model states) takes seconds
    "1b": [
        ("large", dict(hidden=2048, layers=16, vocab=32000, rank=8)),
        ("small", dict(hidden=512, layers=12, vocab=16000, rank=32)),
    ],
    "smoke": [
        ("large", dict(hidden=256, layers=2, vocab=4000, rank=8)),
        ("small", dict(hidden=128, layers=2, vocab=1000, rank=16)),
    ],
}
MMAP_THRESHOLD = 128 * 1024  # glibc's, fixed: freed buffers leave the resident size (as in gathered_save.py)


def llama_config(shape: dict):
    from transformers import LlamaConfig

    heads = max(1, shape["hidden"] // 64)
    return LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=int(shape["hidden"] * 2.75), num_hidden_layers=shape["layers"],
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=shape["vocab"],
    )  # fmt: skip


def lora_model(config, rank: int):
    """LoRA on q_proj, v_proj of a Llama built from `config`, seeded: the same base in every process."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=rank, target_modules=["q_proj", "v_proj"]))


def proc_status(field: str) -> int:
    """A /proc/self/status size (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def reset_peak() -> int:
    """Sets the kernel's peak resident size (VmHWM) to the current one, and returns that."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status("VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """The environment of a measured child process: offline, DeepSpeed without its ops, glibc's mmap threshold
    fixed, this checkout importable."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", DS_BUILD_OPS="0", **extra)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_ranks(script: Path, args: list[str], world: int, what: str) -> list[dict]:
    """`script args` as `world` gloo ranks on loopback (one CPU thread each, DeepSpeed on its CPU accelerator), as
    torchrun would start them; each rank's last stdout line, parsed as JSON. Exits naming `what` (with every
    rank's output) if any rank failed."""
    port, procs = free_port(), []
    for rank in range(world):
        where = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world, "MASTER_PORT": port}
        env = child_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1",
                        **{k: str(v) for k, v in where.items()})  # fmt: skip
        cmd = [sys.executable, str(script), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        for rank, (stdout, stderr) in enumerate(outs):
            print(f"--- rank {rank} (exit {procs[rank].returncode})\n{stdout[-2000:]}\n{stderr[-4000:]}")
        sys.exit(f"{what} failed")
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outs]
