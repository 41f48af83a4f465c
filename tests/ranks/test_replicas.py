"""Replicated tensors that drifted apart between ranks: fingerprints tell them apart, and save_shards refuses
to vouch for a set that would mix them."""

from __future__ import annotations

import pytest
import torch
from multirank import run_ranks

from shardsave.ranks.replicas import diverging, fingerprints


def test_fingerprints_see_one_ulp_and_a_reordering():
    a = torch.randn(64, 7)
    one_ulp = a.clone()
    one_ulp[3, 2] = torch.nextafter(one_ulp[3, 2], torch.tensor(10.0))
    swapped = a.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    prints = fingerprints({"a": a, "same": a.clone(), "ulp": one_ulp, "swapped": swapped})
    assert prints["a"] == prints["same"]
    assert len({prints["a"], prints["ulp"], prints["swapped"]}) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.uint8])
def test_fingerprints_of_every_width(dtype):
    t = (torch.rand(5, 3) * 100).to(dtype)  # 15 elements: odd byte counts for 1-byte types
    changed = t.clone()
    changed.view(-1)[-1] += 1
    assert fingerprints({"t": t})["t"] != fingerprints({"t": changed})["t"]


def test_fingerprints_over_several_chunks(monkeypatch):
    monkeypatch.setattr("shardsave.ranks.replicas._CHUNK", 16)
    t = torch.randn(100)
    moved = torch.cat([t[50:], t[:50]])
    assert fingerprints({"t": t})["t"] != fingerprints({"t": moved})["t"]


def test_diverging_names_only_what_differs():
    assert diverging({0: {"x": "1", "y": "2"}, 1: {"x": "1", "y": "3"}}) == ["y"]
    assert diverging({0: {"x": "1"}, 1: {"x": "1"}}) == []


@pytest.mark.multirank
def test_save_shards_refuses_out_of_sync_replicas(tmp_path):
    results = run_ranks("replicas_out_of_sync", tmp_path)
    r0, r1 = results
    assert r0.result["type"] == "SaveError", r0.output[-3000:]
    assert "differ between ranks" in r0.error and "lora_A" in r0.error and "no manifest was written" in r0.error
    assert r1.result["type"] == "RemoteError" and "differ between ranks" in r1.error
    assert not (tmp_path / "shards" / "manifest.json").exists()
