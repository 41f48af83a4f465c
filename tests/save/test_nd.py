"""Two-dimensional layouts on 4 gloo ranks (a 2 x 2 mesh): FSDP2 HSDP, tensor-parallel LoRA under FSDP2, FSDP1
HYBRID_SHARD, ZeRO++ hpZ, and ZeRO-3 with CPU offload. Each save equals PEFT's own save of the natively gathered
weights byte for byte, the shard set merges into the same files, save_merged writes PEFT's merged files, PEFT
loads it with the trained logits, and
load_pretrained restores them into a fresh model under the same layout (an lr=0 step keeps them); copies that
drifted apart are refused on every rank."""

from __future__ import annotations

import json

import pytest
import torch
from multirank import check_ok, run_ranks
from tiny import assert_same_files

import shardsave

pytestmark = pytest.mark.multirank
#: CPU offload: ZeRO-3's offload_param / offload_optimizer run on CPU; FSDP1's CPUOffload and FSDP2's
#: CPUOffloadPolicy need an accelerator ("Cannot access accelerator device when none is available").
LAYOUTS = ["hsdp", "tp", "fsdp1_hybrid", "hpz", "zero3_offload", "tp_replicated_a"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("nd")
    check_ok(run_ranks("nd_save", out, world_size=4, limit=900, layouts=LAYOUTS))
    return out


@pytest.mark.parametrize("layout", LAYOUTS[:-1])
def test_layout_saves_what_peft_saves(saved, layout, tmp_path):
    from peft import LoraConfig, PeftModel
    from tiny import base_model, logits, peft_model

    model = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"]))
    folder = saved / layout
    assert not list(folder.glob("error-*.txt")), [p.read_text() for p in folder.glob("error-*.txt")]
    assert_same_files(folder / "ours", folder / "theirs", model)
    shardsave.merge_shards(folder / "shards", tmp_path / "merged")
    assert_same_files(folder / "ours", tmp_path / "merged", model)
    trained = torch.load(folder / "logits.pt")
    loaded = PeftModel.from_pretrained(base_model(), str(folder / "ours")).eval()
    torch.testing.assert_close(logits(loaded), trained, atol=1e-5, rtol=1e-5)
    names = sorted(p.name for p in (folder / "merged_theirs").iterdir())  # save_merged: PEFT's merged files
    assert sorted(p.name for p in (folder / "merged").iterdir()) == names
    for name in names:
        assert (folder / "merged" / name).read_bytes() == (folder / "merged_theirs" / name).read_bytes(), name
    after = torch.load(folder / "after_load.pt")  # load_pretrained into a fresh model, then an lr=0 step
    torch.testing.assert_close(after["load"], trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after["step"], trained, atol=1e-5, rtol=1e-5)


def test_replicas_that_drifted_apart_are_refused_on_every_rank(saved):
    """lora_A left whole on each tensor-parallel rank gets different gradients there: its copies differ, and
    gathering any one of them would be a silent choice."""
    folder = saved / "tp_replicated_a"
    errors = [(folder / f"error-{rank}.txt").read_text() for rank in range(4)]
    assert all("differ between the ranks that hold copies" in e and "lora_A" in e for e in errors), errors
    assert not (folder / "ours").exists()


@pytest.mark.parametrize("layout, held", [("hsdp", 1 / 2), ("tp", 1 / 4), ("fsdp1_hybrid", 1 / 2), ("hpz", 1 / 4)])
def test_replicas_cost_nothing_extra(saved, layout, held):
    """Measured: the bytes the ranks send in the save are the adapter's bytes the writer does not hold itself
    (no replica sends what the writer, or another sender, already has)."""
    from safetensors.torch import load_file

    adapter = sum(
        t.numel() * t.element_size() for t in load_file(saved / layout / "ours" / "adapter_model.safetensors").values()
    )
    sent = sum(json.loads((saved / layout / f"sent-{rank}.json").read_text()) for rank in range(4))
    assert 0 < sent <= adapter * (1 - held) + 64 * 4, (sent, adapter)


def test_the_world_group_runs_one_collective_before_the_first_point_to_point_send(saved):
    """FSDP2 on a 2-D mesh runs collectives on its sub-groups only, so the world group has run none when the first
    save's gather sends point to point (undefined on NCCL, see `batch_isend_irecv`). Every rank runs one all_reduce
    on the world group before its first send, once per process: the later layouts' saves run none. (gloo sends
    fine without it, so this checks that the warm-up happens, not that NCCL would hang without it.)"""
    first, *later = [layout for layout in LAYOUTS if layout != "tp_replicated_a"]
    assert first == "hsdp" and "batch_isend_irecv" in json.loads((saved / first / "calls-0.json").read_text())
    for rank in range(4):
        calls = json.loads((saved / first / f"calls-{rank}.json").read_text())
        assert calls.count("all_reduce") == 1 and calls[0] == "all_reduce", (rank, calls)
        for layout in later:
            calls = json.loads((saved / layout / f"calls-{rank}.json").read_text())
            assert "all_reduce" not in calls, (layout, rank, calls)
