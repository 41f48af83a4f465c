"""`shardsave.save_merged` from the live sharded model on 2 gloo ranks: the files equal PEFT's
`merge_and_unload().save_pretrained()` of the same weights byte for byte (config, generation config, every
safetensors shard, the index), load with `from_pretrained` to the merged model's logits, and the live model
is unchanged (its logits, and training goes on)."""

from __future__ import annotations

import json

import pytest
import torch
from multirank import check_ok, run_ranks

pytestmark = pytest.mark.multirank
CASES = [
    ["ddp", "lora"],
    ["fsdp2", "lora"],
    ["fsdp1", "lora"],
    ["zero3", "lora"],
    ["fsdp2", "dora"],  # FSDP2's rows: merged where they are held
    ["zero3", "dora"],  # runs that cut rows: DoRA's norm needs whole rows, merged whole on the writer
    ["fsdp1_flat", "dora_bf16"],
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("merged")
    check_ok(run_ranks("merged_save", out, world_size=2, limit=900, cases=CASES))
    return out


@pytest.mark.parametrize("backend, variant", CASES)
def test_save_merged_writes_what_peft_writes(saved, backend, variant):
    from tiny import logits
    from transformers import AutoModelForCausalLM

    folder = saved / f"{backend}-{variant}"
    ours, theirs = folder / "ours", folder / "theirs"
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) >= 2
    for name in names:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    loaded = AutoModelForCausalLM.from_pretrained(str(ours)).eval()
    torch.testing.assert_close(logits(loaded), torch.load(folder / "logits.pt"), atol=0, rtol=0)
    assert all(json.loads((folder / f"unchanged-{rank}.json").read_text()) for rank in range(2))
