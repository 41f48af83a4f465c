"""`save_merged` when one rank fails alone, on 2 gloo ranks (scenario `merged_failures`): every rank raises that
rank's error within the timeout (no rank waits in a gather or broadcast the other left), nothing is published, the
previous folder stays byte for byte; a parallel write whose bytes did not hold (zeros where a rank wrote) is found
by reading back and never published; the filesystem type decides a parallel write on every rank alike; LoRA copies
that drifted apart are refused; and a writer-only failure while restaging a pipeline save is agreed."""

from __future__ import annotations

import json

import pytest
from multirank import check_ok, run_ranks

pytestmark = pytest.mark.multirank
TIMEOUT = 20
FAILING = ["factors_prepare", "factors_sent", "merge", "merge_parallel", "zeros"]
FUSE = ["fuse_writer", "fuse_rank1"]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("merged-failures")
    params = {"cases": FAILING + FUSE, "extra": ["replicas", "restage"], "timeout": TIMEOUT}
    check_ok(run_ranks("merged_failures", out, world_size=2, limit=600, **params))
    return [json.loads((out / f"outcomes-{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("case", FAILING)
def test_one_rank_failing_fails_every_rank_within_the_timeout(outcomes, case):
    own, other = outcomes[1][case], outcomes[0][case]
    assert own["outcome"] != "returned" and other["outcome"] != "returned", (own, other)
    assert other["outcome"].startswith("RemoteError") and "failed on rank 1" in other["outcome"], other
    if case == "zeros":
        assert own["outcome"].startswith("SaveError"), own
        for text in (own["outcome"], other["outcome"]):
            assert "read back different" in text and "parallel_write=False" in text and ".safetensors" in text, text
            assert "rank 1" in text, text
    else:
        assert "injected" in own["outcome"] and "injected" in other["outcome"], (own, other)
    for rank in range(2):
        assert outcomes[rank][case]["elapsed"] < TIMEOUT, (rank, outcomes[rank][case])
        assert outcomes[rank][case]["after"], f"{case}: the previous merged folder changed"
        assert outcomes[rank][case]["leftovers"] == [], outcomes[rank][case]


@pytest.mark.parametrize("case", FUSE)
def test_a_rank_on_fuse_makes_every_rank_stream(outcomes, case):
    """The writer's filesystem, or another rank's view of the staged folder, is gcsfuse: no rank writes in place,
    and the streamed files equal the first (parallel) save's byte for byte."""
    for rank in range(2):
        result = outcomes[rank][case]
        assert result["outcome"] == "returned" and result["after"], result
        assert result["pwrites"] == 0, result
        assert outcomes[rank]["zeros"]["pwrites"] > 0  # the same folder on ext4 / tmpfs: written in place


def test_drifted_lora_copies_are_refused_on_every_rank(outcomes):
    for rank in range(2):
        result = outcomes[rank]["replicas"]
        assert result["outcome"].startswith("ValueError") and "lora_A" in result["outcome"], result
        assert "differ between the ranks" in result["outcome"] and not result["written"], result


def test_a_writer_failing_while_restaging_is_agreed(outcomes):
    """Pipeline stages (save_pretrained): the writer cannot allocate the restaged gather; the other rank hears it
    at once instead of sending into a gather nobody receives."""
    writer, other = outcomes[0]["restage"], outcomes[1]["restage"]
    assert writer["outcome"].startswith("OutOfMemoryError"), writer
    assert other["outcome"].startswith("RemoteError") and "failed on rank 0" in other["outcome"], other
    assert "injected: no memory" in other["outcome"]
    assert writer["elapsed"] < TIMEOUT and other["elapsed"] < TIMEOUT
    assert not writer["written"]
