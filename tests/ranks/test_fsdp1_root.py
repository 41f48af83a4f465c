"""Finding the FSDP1 root from the inner model (what `accelerator.unwrap_model` returns): the wrapper is
found with a bounded number of heap scans, however many other objects hold the model, and remembered."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
from multirank import free_port
from peft import LoraConfig
from tiny import peft_model

from shardsave.ranks.collect.fsdp1 import outermost_fsdp


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def referrer_scans(monkeypatch):
    calls = []
    real = gc.get_referrers

    def counting(*objs):
        calls.append(len(objs))
        return real(*objs)

    monkeypatch.setattr(gc, "get_referrers", counting)
    return calls


def fsdp1_wrapped(model, use_orig_params: bool):
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(
        model,
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),
    )


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_root_found_in_three_scans_whatever_holds_the_model(use_orig_params, one_rank_group, referrer_scans):
    model = peft_model(LoraConfig(target_modules=["q_proj"]))
    wrapped = fsdp1_wrapped(model, use_orig_params)
    holders = [{"model": model} for _ in range(8)]  # a trainer's, callbacks', a config's references
    assert outermost_fsdp(model) is wrapped
    assert len(referrer_scans) <= 3, referrer_scans  # one scan per reference link, not one per holder
    referrer_scans.clear()
    assert outermost_fsdp(model) is wrapped  # remembered: no scan
    assert referrer_scans == []
    del holders


def test_unmanaged_model_needs_no_scan(referrer_scans):
    model = peft_model(LoraConfig(target_modules=["q_proj"]))
    assert outermost_fsdp(model) is model
    assert referrer_scans == []
