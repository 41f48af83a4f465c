"""What a save's start puts through the store at hundreds of ranks (threads as ranks, the handshake's `start` itself,
on a store that counts bytes; benchmarks/store_bytes.py): one digest per rank and replica group instead of a
fingerprint per run, the fingerprints asked for only when a group's copies differ (and the error still names the
run), and a pipeline's union deleted from the store once every rank has read it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from shardsave.plan.stages import pack_union, union_views, unpack_union
from shardsave.ranks.replicas import digests, to_ask

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "store_bytes.py"
_spec = importlib.util.spec_from_file_location("store_bytes", _PATH)
bench = sys.modules.setdefault("store_bytes", importlib.util.module_from_spec(_spec))  # (its dataclass looks it up)
_spec.loader.exec_module(bench)


def test_rank_zero_compares_digests_and_asks_one_rank_per_distinct_digest():
    prints = {g: {f"t{i}@0": f"{i:032x}" for i in range(448)} for g in ("a", "b")}
    posted = digests(prints)
    assert set(posted) == {"a", "b"} and all(len(d) == 32 for d in posted.values())
    by_rank = {r: dict(posted) for r in range(1024)}
    assert to_ask(by_rank) == {}
    drifted = {**prints, "b": {**prints["b"], "t7@0": "f" * 32}}
    by_rank[700] = digests(drifted)
    by_rank[900] = digests(drifted)
    assert to_ask(by_rank) == {0: ["b"], 700: ["b"]}  # the lowest rank of each distinct digest, of that group only


@pytest.mark.parametrize("n", [256, 512])
def test_hsdp_start_reads_a_digest_per_rank_not_its_fingerprints(n):
    """HSDP, shards of 8 ranks: each rank posts one digest for its replica group. Before: every rank's fingerprint
    of each of its 448 runs (~120 bytes each), 27 MB into rank 0 at 512 ranks."""
    row = bench.simulate("HSDP", n)
    assert not row["errors"], row["errors"]
    assert row["read0"] < 400 * n  # its status: args, one digest; before: > 50 kB per rank
    assert row["read_other"] < 2_000  # the verdict only
    assert row["peak"] < 500 * n


def test_copies_that_differ_are_named_on_every_rank_after_a_second_round():
    n, rank, index = 256, 77, 5
    row = bench.simulate("HSDP", n, drift=(rank, index))
    name = list(bench.tensors())[index]
    errors = row["errors"]
    assert sorted(errors) == list(range(n)), sorted(errors)[:8]
    for error in errors.values():
        assert isinstance(error, ValueError), error
        text = str(error)
        assert text.startswith("1 run(s) of sharded tensors differ between the ranks that hold copies"), text
        assert f"e.g. {name} from element " in text and f"on ranks {list(range(rank % 8, n, 8))}" in text, text
    second = row["read0"] - bench.simulate("HSDP", n)["read0"]
    assert second < 2 * 60_000 + 100 * n  # the second round: ranks 5 and 77 post their fingerprints, the rest "ok"


@pytest.mark.parametrize("layout", ["pipeline x DDP", "pipeline x FSDP"])
def test_pipeline_union_is_every_part_put_together_and_leaves_the_store_when_read(layout):
    n = 64
    row = bench.simulate(layout, n)
    assert not row["errors"], row["errors"]
    inner = "ddp" if layout == "pipeline x DDP" else "fsdp"
    assert row["union"] == union_views({r: bench.stage_view(r, n, inner) for r in range(n)})
    one_view = len(str(bench.stage_view(0, n, inner)))
    assert row["left"] < one_view  # before: every view and the union stayed until the next call
    if inner == "ddp":  # the replicas of a stage post one view between them
        assert row["read0"] < 2 * bench.STAGES * one_view


def test_packed_union_lists_each_set_of_holders_and_each_list_of_entries_once():
    runs = {"a": [[0, 2, [0, 1]], [2, 4, [2, 3]]], "b": [[0, 4, [0, 1]]]}
    pairs = [["a.lora_A.weight", "a"], ["b.lora_B.weight", "b"]]
    entries = {"default": {"0": pairs, "1": list(pairs)}, "other": {"0": pairs, "1": pairs[:1]}}
    union = {"tensors": {"a": [[4], "float32", True]}, "runs": runs, "entries": entries}
    packed = pack_union(union)
    assert packed["holders"] == [[0, 1], [2, 3]] and packed["runs"]["b"] == [[0, 4, 0]]
    assert packed["entries"] == {"default": {"0": pairs, "1": "0"}, "other": {"0": pairs, "1": pairs[:1]}}
    assert unpack_union(packed) == union
