"""The scale goals of one gathered save at 1024 simulated ranks, through the pure models of
benchmarks/rank_count.py: the writer receives at most 1.1x the adapter and holds at most 1.5x it extra, in
a bounded number of copies, under every backend's layout; the agreement costs O(N) store operations in all
and O(1) on every rank but rank 0."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from shardsave.plan.ranges import MAX_ROUND_PEERS

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "rank_count.py"
_spec = importlib.util.spec_from_file_location("rank_count", _PATH)
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)

N = 1024


@pytest.fixture(scope="module")
def shapes():
    return scale.lora_shapes()


@pytest.mark.parametrize("backend", ["FSDP2", "FSDP1 (layer units)", "ZeRO-3"])
def test_gather_goals_at_1024_ranks(shapes, backend):
    """FSDP1 with PEFT's wrap policy lays the adapter out exactly as ZeRO-3 does (one tensor per flat
    parameter, ceil(numel / N) per rank), so ZeRO-3 stands for both."""
    layout = scale.LAYOUTS[backend](shapes, N)
    stats = scale.plan_stats(layout, shapes)
    adapter = stats["adapter_bytes"]
    assert adapter == 39_976_960 * 2  # 32 layers x 7 projections, r=16, bf16
    assert stats["received_bytes"] <= 1.1 * adapter
    assert stats["peak_extra_bytes"] <= 1.5 * adapter + 16 * len(shapes)  # + each tensor's 16-byte alignment
    # rounds: half the adapter each, from at most MAX_ROUND_PEERS senders each (issue 23, item 13)
    groups = -(-(N - 1) // MAX_ROUND_PEERS)
    assert stats["rounds"] <= groups + 2 and stats["copy_ops"] <= stats["rounds"] + 1
    old = scale.old_gather_stats(layout, N)
    assert old["peak_extra_bytes"] > 1.5 * adapter  # the model tells the designs apart


def test_flat_runs_match_fsdp1_padding():
    """Rank k holds [k*S, (k+1)*S) of the aligned, padded flat parameter; runs are clipped to each tensor."""
    runs = scale.flat_runs([[("a", 10), ("b", 5)]], 4, align=8)  # a at 0, b at 16; 21 elements -> S = 6
    assert [(s.rank, s.start, s.stop) for s in runs["a"]] == [(0, 0, 6), (1, 6, 10)]
    assert [(s.rank, s.start, s.stop) for s in runs["b"]] == [(2, 0, 2), (3, 2, 5)]


@pytest.fixture(scope="module")
def agreement():
    return {n: scale.simulate_agreement(n) for n in (64, N)}


def test_agreement_store_ops_are_linear(agreement):
    """Per save, once the previous save's keys are deleted: a constant number of operations on every rank
    (rank 0: one wait and one multi_get for all statuses, its sets and deletes), so O(N) in all."""
    for n, result in agreement.items():
        per_rank = [sum(c.values()) for c in result["counts"][-1]]
        assert max(per_rank[1:]) <= 8
        assert per_rank[0] <= 10
        assert sum(per_rank) <= 8 * n
        assert scale.old_agreement_ops(n) > n * n


def test_agreement_leaves_no_keys_behind(agreement):
    for n, result in agreement.items():
        # only the last save's keys (each rank's status, the verdict, done and beat), deleted at the next save:
        # after two saves, no more than after one
        assert result["keys_left"] <= n + 4
