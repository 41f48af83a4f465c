"""Pipeline stages on 4 gloo ranks (2 stages x 2 data-parallel ranks, trained with `torch.distributed.pipelining`):
the ranks hold different modules, and the adapter saved is the union of all stages, each tensor once, equal to
PEFT's save of the same weights byte for byte; shards merge to the same files, PEFT loads it with the
pipeline's logits, load_pretrained restores every stage, gather_state_dict gives every stage's tensors; stages
that renumber their layers are refused on every rank."""

from __future__ import annotations

import json

import pytest
import torch
from multirank import check_ok, run_ranks
from tiny import assert_same_files

import shardsave

pytestmark = pytest.mark.multirank
LAYOUTS = ["pp", "pp_fsdp2", "pp_fsdp1", "pp_renumbered"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp")
    check_ok(run_ranks("pp_save", out, world_size=4, limit=900, layouts=LAYOUTS))
    return out


@pytest.mark.parametrize("layout", LAYOUTS[:-1])
def test_stages_save_their_union_as_peft_does(saved, layout, tmp_path):
    from peft import LoraConfig, PeftModel
    from tiny import base_model, logits, peft_model

    folder = saved / layout
    assert not list(folder.glob("error-*.txt")), [p.read_text() for p in folder.glob("error-*.txt")]
    model = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    assert_same_files(folder / "ours", folder / "theirs", model)
    shardsave.merge_shards(folder / "shards", tmp_path / "merged")
    assert_same_files(folder / "ours", tmp_path / "merged", model)
    loaded = PeftModel.from_pretrained(base_model(), str(folder / "ours")).eval()
    torch.testing.assert_close(logits(loaded), torch.load(folder / "logits.pt"), atol=1e-5, rtol=1e-5)
    states = torch.load(folder / "states.pt")
    trained = states["trained"]
    assert any("layers.0." in k for k in trained) and any("layers.1." in k for k in trained)
    assert any("lm_head" in k for k in trained)  # held by stage 1 only: the writer (rank 0) holds none of it
    assert states["loaded"].keys() == trained.keys() == states["gathered"].keys()
    for name, tensor in trained.items():
        assert torch.equal(states["loaded"][name], tensor), name
        assert torch.equal(states["gathered"][name], tensor), name
    assert all(json.loads((folder / f"load-{r}.json").read_text()) == [] for r in range(4))


def test_save_merged_refuses_stages_on_every_rank_and_says_what_to_do(saved):
    for layout in LAYOUTS[:-1]:
        outcomes = [(saved / layout / f"merged-{rank}.txt").read_text() for rank in range(4)]
        assert all("pipeline stage" in o and "merge it offline" in o for o in outcomes), outcomes
        assert not (saved / layout / "merged").exists()


def test_stages_that_renumber_their_layers_are_refused_on_every_rank(saved):
    folder = saved / "pp_renumbered"
    errors = [(folder / f"error-{rank}.txt").read_text() for rank in range(4)]
    assert all("renumber" in e and "layers.0" in e for e in errors), errors
    assert not (folder / "ours").exists()
