"""Two gloo ranks under each sharding backend: shardsave's file equals PEFT's single-process save of the
same (natively gathered) weights, and loads into a fresh unsharded model with the sharded model's logits."""

from __future__ import annotations

import pytest
import torch
from multirank import check_ok, run_ranks
from peft import PeftModel
from tiny import assert_same_files, base_model, logits

pytestmark = pytest.mark.multirank

QV = {"target_modules": ["q_proj", "v_proj"]}


def check_backend(tmp_path, backend, lora=QV, model=None, **params):
    results = run_ranks("backend_save", tmp_path, backend=backend, lora=lora, model=model or {}, **params)
    check_ok(results)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(theirs))
    fake = type("M", (), {"peft_config": {"default": config}})()
    assert_same_files(ours, theirs, fake)
    loaded = PeftModel.from_pretrained(base_model(**(model or {})), str(ours)).eval()
    torch.testing.assert_close(logits(loaded), torch.load(tmp_path / "logits.pt"), atol=1e-4, rtol=1e-4)
    return results


@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1", "fsdp1_flat", "zero3", "zero2", "ddp"])
def test_backend_qv(backend, tmp_path):
    check_backend(tmp_path, backend)
