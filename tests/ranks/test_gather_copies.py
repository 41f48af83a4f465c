"""gather_state_dict hands out fresh tensors on every path, and a local failure during the gather is reported
as this rank's own, not as a dead peer."""

from __future__ import annotations

import torch
from peft import LoraConfig
from tiny import peft_model

import shardsave
from shardsave.errors import SaveError
from shardsave.ranks.handshake import run_gather
from shardsave.ranks.identity import Ranks
from shardsave.ranks.rendezvous import Rendezvous


def test_gather_state_dict_returns_copies_not_live_parameters():
    model = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"]))
    got = shardsave.gather_state_dict(model)
    params = dict(model.named_parameters())
    assert got
    for name, tensor in got.items():
        live = params[name]
        assert torch.equal(tensor, live) and tensor.data_ptr() != live.data_ptr(), name
    before = {k: v.clone() for k, v in got.items()}
    with torch.no_grad():
        for p in params.values():
            if p.requires_grad:
                p.add_(1)
    assert all(torch.equal(got[k], before[k]) for k in got)  # training on does not change what was gathered


class _Failing:
    def __init__(self, exc):
        self.exc = exc

    def run(self, timeout):
        raise self.exc


def test_local_error_is_not_blamed_on_another_rank():
    rdv = Rendezvous(Ranks(0, 1), op="save_pretrained", timeout=5)
    _, error = run_gather(_Failing(torch.OutOfMemoryError("CUDA out of memory")), 0, rdv)
    assert isinstance(error, SaveError)
    assert "rank 0 failed while moving" in str(error) and "probably died" not in str(error)
    assert isinstance(error.__cause__, torch.OutOfMemoryError)
    from shardsave.ranks.collect import TransferError

    _, error = run_gather(_Failing(TransferError("receiving round 0 from ranks [1]: timed out")), 0, rdv)
    assert "probably died or stopped responding" in str(error)
