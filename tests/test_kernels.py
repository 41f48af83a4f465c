"""The fused conversion kernel equals the torch reference: on CPU through Triton's interpreter (a
subprocess, since TRITON_INTERPRET must be set before triton is imported), on CUDA for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def test_triton_kernel_matches_torch_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(HERE.parent))
    proc = subprocess.run([sys.executable, str(HERE / "kernel_check.py")], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0 and "kernel ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_conversion_on_cuda_matches_cpu_reference():
    pytest.importorskip("triton")
    from shardsave.convert import convert_tensor
    from shardsave.save import _to_host

    trained = {"m.q.lora_A.weight": torch.randn(8, 64), "m.q.lora_B.weight": torch.randn(64, 8),
               "m.head.weight": torch.randn(10, 64)}  # fmt: skip
    initial = {k: torch.randn_like(v) for k, v in trained.items() if "lora" in k}
    host = _to_host({k: v.cuda() for k, v in trained.items()}, initial)
    for key, tensor in trained.items():
        assert host[key].device.type == "cpu"
        assert torch.equal(host[key], convert_tensor(key, tensor, initial.get(key)))
