"""Every CPU-capable launch script runs with 2 ranks and a few steps, and reports that PEFT loads both the
gathered and the merged adapter with the trained model's logits (the scripts exit non-zero otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from multirank import free_port

pytestmark = pytest.mark.multirank
ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], tmp_path: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd + ["--out", str(tmp_path / "out"), "--steps", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "OK: both saves load with PEFT" in output, output[-5000:]
    return output


def torchrun(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), f"launch_scripts/{script}", *args]  # fmt: skip


def test_torchrun_fsdp2_then_resumed_under_fsdp1(tmp_path):
    output = run(torchrun("train_fsdp2.py"), tmp_path)
    assert "shardsave: saved 1 adapter(s)" in output and "[rank 1] shardsave" not in output  # rank-0 logging
    output = run(torchrun("train_fsdp1.py", "--resume"), tmp_path)  # FSDP2's adapter loaded into FSDP1
    assert "logits match the saved run's: True" in output, output[-3000:]


@pytest.mark.parametrize("extra", [[], ["--use-orig-params", "--lora", "configs/lora_all_linear.json"]])
def test_torchrun_fsdp1(extra, tmp_path):
    run(torchrun("train_fsdp1.py", *extra), tmp_path)


@pytest.mark.parametrize("config", ["configs/ds_zero2.json", "configs/ds_zero3.json"])
def test_deepspeed_launcher(config, tmp_path):
    pytest.importorskip("deepspeed")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch_scripts/train_deepspeed.py",
           "--deepspeed_config", config]  # fmt: skip
    run(cmd, tmp_path)


def test_accelerate_script_refuses_cpu_clearly(tmp_path):
    """accelerate's FSDP/DeepSpeed plugins need GPUs; on CPU the script says so instead of training alone."""
    import torch

    if torch.cuda.device_count() >= 2:
        run(["accelerate", "launch", "--config_file", "configs/accelerate_fsdp2.yaml", "--main_process_port",
             str(free_port()), "launch_scripts/train_accelerate.py"], tmp_path)  # fmt: skip
        return
    proc = subprocess.run(
        ["accelerate", "launch", "--config_file", "configs/accelerate_fsdp2.yaml", "--main_process_port",
         str(free_port()), "launch_scripts/train_accelerate.py", "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and output.count("need GPUs") == 1, output[-3000:]  # said once, by rank 0
    assert "exitcode  : 2" in output and "Traceback" not in output.split("need GPUs")[0], output[-3000:]
