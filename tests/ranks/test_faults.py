"""A rank SIGKILLed in the middle of a save, at several points: the survivors raise within the timeout, the
destination holds the previous complete adapter (or, once swapped in, the new complete one) and never a mix,
no hidden leftovers survive, and a fresh job's save then succeeds."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from multirank import check_ok, run_ranks
from peft import PeftModel
from safetensors.torch import load_file
from tiny import base_model, files_under

pytestmark = pytest.mark.multirank

TIMEOUT = 8  # seconds a survivor waits for a dead rank
SLACK = 20  # process start-up, gloo noticing the dead peer, loaded CI machines


def snapshot(root):
    return {rel: (root / rel).read_bytes() for rel in files_under(root)}


def hidden_leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def kill(tmp_path, op, point, victim, writer_rank=0):
    """Run the scenario; return (survivor's result, adapter/shards state before the killed save)."""
    results = run_ranks(
        "killed_mid_save", tmp_path, op=op, point=point, victim=victim, writer=writer_rank, timeout=TIMEOUT,
        no_barrier=True, limit=180,
    )  # fmt: skip
    dead, alive = results[victim], results[1 - victim]
    assert dead.returncode == -signal.SIGKILL, dead.output[-3000:]
    assert alive.result and not alive.result["ok"], alive.output[-3000:]
    assert float((tmp_path / f"elapsed-{alive.rank}").read_text()) < TIMEOUT + SLACK
    return alive


def rerun(tmp_path, op):
    check_ok(run_ranks("plain_save", tmp_path, op=op, limit=180))


SAVE_CASES = {
    # point: (victim, writer, survivor's error type, words in its message)
    "start": (1, 0, "MissingRanksError", "rank(s) [1] of 2 did not reach the 'start' step"),
    "start-store-host": (0, 1, "SaveError", "lost the process group's key-value store"),
    "gather": (1, 0, "SaveError", "moving the adapter's tensors to rank 0 failed on rank 0"),
    "weights": (1, 1, "MissingRanksError", "rank(s) [1] of 2 did not reach the 'done' step"),
    "publish": (1, 1, "MissingRanksError", "rank(s) [1] of 2 did not reach the 'done' step"),
    "swap": (1, 1, "MissingRanksError", "rank(s) [1] of 2 did not reach the 'done' step"),
}


def test_rank_stuck_in_the_gather_ends_in_an_error_within_the_timeout(tmp_path):
    """A rank that is alive but never sends (gloo would wait for its own 30-minute timeout)."""
    results = run_ranks(
        "killed_mid_save", tmp_path, op="save_pretrained", point="hang_gather", victim=1, timeout=TIMEOUT,
        no_barrier=True, limit=180,
    )  # fmt: skip
    writer_rank = results[0]
    assert writer_rank.result["type"] == "SaveError", writer_rank.output[-3000:]
    assert "moving the adapter's tensors to rank 0 failed on rank 0" in writer_rank.error
    assert TIMEOUT - 0.5 < float((tmp_path / "elapsed-0").read_text()) < TIMEOUT + SLACK  # waited, then gave up
    assert snapshot(tmp_path / "adapter") == snapshot(tmp_path / "previous")
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_rank_killed_during_save_pretrained(case, tmp_path):
    victim, writer_rank, error_type, words = SAVE_CASES[case]
    point = case.split("-")[0]
    # the first (complete) save of the scenario is the previous adapter; its bytes are compared after the kill
    alive = kill(tmp_path, "save_pretrained", point, victim, writer_rank)
    assert alive.result["type"] == error_type and words in alive.error, alive.error

    dest, previous = tmp_path / "adapter", tmp_path / "previous"
    assert files_under(dest) == files_under(previous)  # a complete adapter is there, whatever happened
    PeftModel.from_pretrained(base_model(), str(dest))
    new, old = load_file(dest / "adapter_model.safetensors"), load_file(previous / "adapter_model.safetensors")
    if point == "swap":  # killed after the atomic exchange: the new adapter (weights + 1) is in place
        assert all(torch.equal(new[k], old[k] + 1) for k in old)
    else:  # the previous adapter, byte for byte
        assert snapshot(dest) == snapshot(previous)
    # the survivor removed what the dead writer left (same host, dead pid)
    assert hidden_leftovers(tmp_path) == [], hidden_leftovers(tmp_path)

    rerun(tmp_path, "save_pretrained")
    assert hidden_leftovers(tmp_path) == []
    PeftModel.from_pretrained(base_model(), str(dest))


SHARD_CASES = {
    "shard_write": (1, "MissingRanksError", "rank(s) [1] of 2 did not reach the 'done' step"),
    "manifest": (0, "SaveError", "lost the process group's key-value store"),
}


@pytest.mark.parametrize("point", sorted(SHARD_CASES))
def test_rank_killed_during_save_shards(point, tmp_path):
    victim, error_type, words = SHARD_CASES[point]
    alive = kill(tmp_path, "save_shards", point, victim)
    assert alive.result["type"] == error_type and words in alive.error, alive.error
    shards = tmp_path / "shards"
    # no manifest vouches for the interrupted set: the merge refuses it (exit 2) and writes nothing
    assert not (shards / "manifest.json").exists()
    assert [n for n in hidden_leftovers(shards)] == []  # no part-written file left behind
    proc = subprocess.run(
        [sys.executable, "-m", "shardsave.merge", str(shards), "-o", str(tmp_path / "merged"), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    refused = ("manifest.json: missing", "empty: no shard set (manifest.json)")
    assert proc.returncode == 2 and any(words in proc.stderr for words in refused), proc.stderr
    assert not (tmp_path / "merged").exists()

    rerun(tmp_path, "save_shards")
    proc = subprocess.run(
        [sys.executable, "-m", "shardsave.merge", str(shards), "-o", str(tmp_path / "merged"), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    PeftModel.from_pretrained(base_model(), str(tmp_path / "merged"))
