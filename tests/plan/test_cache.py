"""A save's plan is reused only while the module tree is provably unchanged."""

from __future__ import annotations

import gc

import pytest
import torch
from peft import LoraConfig
from tiny import peft_model
from torch import nn

import shardsave
from shardsave.plan.cache import PlanCache, Snapshot


def model():
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)))


CHANGES = {
    "parameter replaced": lambda m: setattr(m[0], "weight", nn.Parameter(torch.zeros(4, 4))),
    "parameter replaced behind the hooks": lambda m: m[0]._parameters.__setitem__("bias", nn.Parameter(torch.ones(4))),
    "parameter added": lambda m: m[0].register_parameter("extra", nn.Parameter(torch.ones(1))),
    "module deleted": lambda m: m[1].__delitem__(1),
    "module replaced": lambda m: m.__setitem__(0, nn.Linear(4, 4)),
    "buffer replaced": lambda m: m[1][1]._buffers.__setitem__("running_mean", torch.zeros(2)),
    "buffer made non-persistent": lambda m: m[1][1]._non_persistent_buffers_set.add("running_var"),
    "requires_grad flipped": lambda m: m[0].weight.requires_grad_(False),
    "parameter set to None": lambda m: m[0]._parameters.__setitem__("bias", None),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_structural_change_is_seen(change):
    m = model()
    snapshot = Snapshot.of(m)
    assert snapshot.unchanged()
    CHANGES[change](m)
    assert not snapshot.unchanged()


def test_values_and_training_are_not_changes():
    m = model()
    snapshot = Snapshot.of(m)
    with torch.no_grad():
        m[0].weight.add_(1)
        m[0].weight.data = torch.randn(4, 4)  # same Parameter, new data: read afresh at every save
    m(torch.randn(3, 4)).sum().backward()
    assert snapshot.unchanged()


def test_snapshot_keeps_nothing_alive():
    m = model()
    cache: PlanCache[int] = PlanCache()
    cache.get(m, "k", lambda: 1)
    ref = __import__("weakref").ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_cache_reuses_until_the_key_or_the_tree_changes():
    m = model()
    cache: PlanCache[int] = PlanCache()
    built = []

    def build():
        built.append(1)
        return len(built)

    assert cache.get(m, "k", build) == 1
    assert cache.get(m, "k", build) == 1  # reused
    assert cache.get(m, "other", build) == 2  # another key
    m.add_module("new", nn.Linear(1, 1))
    assert cache.get(m, "other", build) == 3  # the tree changed


def test_a_save_after_adding_an_adapter_saves_it(tmp_path):
    """The second save sees the adapter added between the two (not a stale plan)."""
    m = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"]))
    shardsave.save_pretrained(m, tmp_path / "one")
    m.add_adapter("second", LoraConfig(target_modules=["q_proj"]))
    shardsave.save_pretrained(m, tmp_path / "two")
    assert (tmp_path / "two" / "second" / "adapter_model.safetensors").is_file()
    m.delete_adapter("second")
    shardsave.save_pretrained(m, tmp_path / "three")
    assert not (tmp_path / "three" / "second").exists()


def test_a_reused_plan_writes_the_new_values(tmp_path):
    """Training between two saves changes values, not structure: the plan is reused, the tensors are read
    afresh, and the file is PEFT's save of the new values."""
    from tiny import assert_same_files

    m = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    shardsave.save_pretrained(m, tmp_path / "one")
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.mul_(2)
    shardsave.save_pretrained(m, tmp_path / "ours")
    m.save_pretrained(str(tmp_path / "theirs"))
    assert_same_files(tmp_path / "ours", tmp_path / "theirs", m)  # new values, not the first save's
