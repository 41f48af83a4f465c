"""How the sharded gather splits its traffic into rounds (pure), and that many small rounds still give
PEFT's file under FSDP2 and ZeRO-3."""

from __future__ import annotations

import pytest

from shardsave.collect.sharded import Slice, plan_rounds, round_budget


def moves(sizes_by_rank: list[tuple[int, int]]):
    return [(f"t{i}", Slice(rank, 0, nbytes), nbytes) for i, (rank, nbytes) in enumerate(sizes_by_rank)]


def test_one_round_when_everything_fits():
    rounds = plan_rounds(moves([(1, 100), (2, 100), (1, 50)]), world_size=3, budget=1000)
    assert len(rounds) == 1
    assert [(m.name, m.offset) for m in rounds[0]] == [("t0", 0), ("t1", 0), ("t2", 112)]  # 16-byte aligned


def test_a_round_closes_when_a_sender_would_pass_the_budget():
    rounds = plan_rounds(moves([(1, 64), (1, 64), (1, 64), (2, 64)]), world_size=3, budget=128)
    assert [[m.name for m in r] for r in rounds] == [["t0", "t1"], ["t2", "t3"]]
    assert all(m.offset + m.nbytes <= 128 for r in rounds for m in r)


def test_a_slice_larger_than_the_budget_travels_alone():
    rounds = plan_rounds(moves([(1, 10), (1, 500), (1, 10)]), world_size=2, budget=100)
    assert [[m.name for m in r] for r in rounds] == [["t0"], ["t1"], ["t2"]]


def test_budget_keeps_receive_buffers_near_half_the_moved_bytes():
    assert round_budget(0, 2) == 2**20  # small adapters: 1 MiB per rank
    mib = 2**20
    assert round_budget(400 * mib, 4) * 4 == 200 * mib  # half of what moves
    assert round_budget(10_000 * mib, 8) * 8 == 256 * mib  # capped
    assert round_budget(10_000 * mib, 1024) == mib  # never below 1 MiB per rank


@pytest.mark.multirank
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_many_rounds_give_the_same_file(backend, tmp_path):
    from test_multirank_backends import check_backend

    check_backend(tmp_path, backend, round_bytes=256, lora={"target_modules": ["q_proj", "v_proj"], "r": 8})
    comm = __import__("json").loads((tmp_path / "comm-0.json").read_text())
    assert len(comm) > 4, comm  # the budget really split the traffic
