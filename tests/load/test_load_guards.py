"""load_pretrained under DeepSpeed where a plain in-place write would be undone or stop halfway (issue 23, item 5),
and a distributed load of a shard set that verifies it once and opens only the files each rank needs (item 11).
One launch of 2 gloo ranks runs every case (tests/scenarios/scenarios_load.py::load_guards)."""

from __future__ import annotations

import pytest
from multirank import check_ok, run_ranks


@pytest.mark.multirank
def test_deepspeed_loads_that_hold(tmp_path):
    results = run_ranks("load_guards", tmp_path, world_size=2, limit=600)
    check_ok(results)
    for r in results:
        seen = r.result
        assert "no_optimizer_error" not in seen, seen["no_optimizer_error"]  # was AttributeError '_z3_optimizer'
        assert seen["no_optimizer"] == [False, True], r.rank
        assert seen["gathered"] == [True, True], r.rank  # the exit re-partitioned the loaded full copy
        assert "offloaded to NVMe" in (seen["refused"] or ""), r.rank  # rank 1's problem, raised on both ranks
        assert seen["refused_unchanged"], r.rank  # ... before any rank wrote a partition
        assert seen["stage0_masters"] == ["FP16_UnfusedOptimizer", True], r.rank  # the fp32 copies hold the load
        assert seen["stage0_stepped"], r.rank  # so an lr=0 step keeps it
    # rank 0 verified the whole set; rank 1 opened the manifest and its own shard once each, nothing else
    # (ZeRO-3 saved and loaded on 2 ranks: rank k's partitions are in shard k)
    opens = {r.rank: r.result["no_optimizer_opens"] for r in results}
    assert opens[1] == {"manifest.json": 1, "shard-00001-of-00002.safetensors": 1}, opens
    assert {"shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"} <= set(opens[0]), opens
