"""ShardSaveCallback inside transformers.Trainer on 2 ranks: every checkpoint holds an adapter that PEFT
loads, and the last one reproduces the trained model."""

from __future__ import annotations

import pytest
import torch
from multirank import check_ok, run_ranks
from peft import PeftModel
from tiny import base_model, logits

pytestmark = pytest.mark.multirank


def test_trainer_callback_two_ranks(tmp_path):
    results = run_ranks("trainer_callback", tmp_path, limit=400)
    check_ok(results)
    assert results[0].result["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
    last = tmp_path / "run" / "checkpoint-2"
    assert (last / "adapter_model.safetensors").exists() and (last / "trainer_state.json").exists()
    loaded = PeftModel.from_pretrained(base_model(), str(last)).eval()
    torch.testing.assert_close(logits(loaded), torch.load(tmp_path / "logits.pt"), atol=1e-4, rtol=1e-4)
