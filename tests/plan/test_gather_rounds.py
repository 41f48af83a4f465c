"""The transfer plan (pure, at simulated scale) and that many small rounds still give PEFT's file under FSDP2
and ZeRO-3."""

from __future__ import annotations

import json

import pytest

from shardsave.plan.ranges import MAX_ROUND_BYTES, Slice, chunk_ranges, plan_transfer, round_budget


def fsdp2_layout(shapes: dict[str, tuple[int, int]], world: int) -> dict[str, list[Slice]]:
    """Dim-0 chunks as FSDP2 shards them: a tensor with fewer rows than ranks sits on `rows` ranks only."""
    out = {}
    for name, (rows, cols) in shapes.items():
        out[name] = [Slice(r, a * cols, b * cols) for r, (a, b) in enumerate(chunk_ranges(rows, world))]
    return out


def lora_shapes(layers: int, r: int, hidden: int) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(layers):
        for proj in ("q", "v"):
            shapes[f"l{i}.{proj}.lora_A"] = (r, hidden)
            shapes[f"l{i}.{proj}.lora_B"] = (hidden, r)
    return shapes


def check_plan(layout, itemsize: int, dst: int, budget=None, peers=None):
    numels = {n: max(s.stop for s in slices) if slices else 0 for n, slices in layout.items()}
    plan = plan_transfer(layout, {n: itemsize for n in layout}, numels, dst, budget=budget, peers=peers)
    covered = {n: [0] * numels[n] for n in layout}
    for piece in [*plan.own, *(p for r in plan.rounds for p in r.pieces)]:
        holders = [
            s for s in layout[piece.name] if s.rank == piece.rank and s.start <= piece.start < piece.stop <= s.stop
        ]
        assert holders, piece  # every piece comes from a rank that holds it
        for i in range(piece.start, piece.stop):
            covered[piece.name][i] += 1
        assert piece.dst_offset == plan.offsets[piece.name] + piece.start * itemsize
    assert all(c == 1 for counts in covered.values() for c in counts)  # every element exactly once
    for r in plan.rounds:
        for rank, size in r.sizes.items():  # a sender's pieces are packed back to back, exactly
            mine = sorted((p for p in r.pieces if p.rank == rank), key=lambda p: p.src_offset)
            assert [p.src_offset for p in mine] == [sum(q.count * itemsize for q in mine[:i]) for i in range(len(mine))]
            assert size == sum(p.count * itemsize for p in mine)
        assert dst not in r.sizes
    return plan


def test_every_element_once_from_a_holder_and_exact_sizes():
    layout = {"a": [Slice(0, 0, 10), Slice(1, 10, 25), Slice(2, 25, 25)], "b": None, "c": [Slice(2, 0, 7)]}
    layout["b"] = [Slice(1, 0, 3), Slice(2, 3, 6)]
    plan = check_plan(layout, 4, dst=0, budget=32)
    assert plan.stats()["received_bytes"] == (15 + 6 + 7) * 4
    assert all(r.nbytes <= 32 for r in plan.rounds)


def test_a_slice_larger_than_the_budget_is_split_across_rounds():
    plan = check_plan({"big": [Slice(1, 0, 1000)]}, 2, dst=0, budget=600)
    assert [r.nbytes for r in plan.rounds] == [600, 600, 600, 200]


def test_budget_is_half_of_what_moves_and_capped():
    mib = 2**20
    assert round_budget(400 * mib) == 200 * mib
    assert round_budget(10_000 * mib) == MAX_ROUND_BYTES
    assert round_budget(0) == 1


@pytest.mark.parametrize("world", [2, 64, 512, 1024])
def test_scale_fsdp2_small_rank_lora(world):
    """FSDP2 at N ranks, r=8 < N: lora_A sits on 8 ranks. The writer receives exactly the bytes others hold
    (never N x the largest), in rounds of at most half the adapter; its peak stays under 1.5x the adapter;
    one copy per round; ranks that hold nothing of a round are not in it."""
    shapes = lora_shapes(layers=4, r=8, hidden=256)
    layout = fsdp2_layout(shapes, world)
    plan = check_plan(layout, 2, dst=0)
    adapter = sum(rows * cols * 2 for rows, cols in shapes.values())
    stats = plan.stats()
    held_elsewhere = sum((s.stop - s.start) * 2 for slices in layout.values() for s in slices if s.rank != 0)
    assert stats["received_bytes"] == held_elsewhere <= adapter
    assert stats["largest_round_bytes"] <= adapter / 2 + 2
    assert stats["peak_extra_bytes"] <= 1.5 * adapter + 16 * len(shapes)
    assert stats["copy_ops"] == stats["rounds"] + 1
    senders = {rank for r in plan.rounds for rank in r.sizes}
    assert senders == {s.rank for slices in layout.values() for s in slices if s.rank != 0 and s.stop > s.start}


@pytest.mark.multirank
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_many_rounds_give_the_same_file(backend, tmp_path):
    from backend_checks import check_backend

    check_backend(tmp_path, backend, round_bytes=256, lora={"target_modules": ["q_proj", "v_proj"], "r": 8})
    comm = json.loads((tmp_path / "comm-1.json").read_text())
    assert len(comm) > 4, comm  # the budget really split the traffic


@pytest.mark.parametrize("world", [512, 1024])
def test_the_writer_receives_from_at_most_max_round_peers_ranks_at_once(world):
    """All-to-one point to point from 511 or 1023 peers at once would need a receive buffer per peer on the writer
    at the same time; rounds take senders in groups of `MAX_ROUND_PEERS` consecutive ranks. The cost: at least
    one round per group (more where a group's bytes pass the round budget), the bytes and the writer's peak
    unchanged."""
    from shardsave.plan.ranges import MAX_ROUND_PEERS

    shapes = lora_shapes(layers=4, r=8, hidden=4096)  # lora_B's 4096 rows on every rank
    layout = fsdp2_layout(shapes, world)
    plan = check_plan(layout, 2, dst=0)
    senders = sorted({rank for r in plan.rounds for rank in r.sizes})
    assert senders == list(range(1, world))
    assert all(len(r.sizes) <= MAX_ROUND_PEERS for r in plan.rounds)
    group_of = [{senders.index(rank) // MAX_ROUND_PEERS for rank in r.sizes} for r in plan.rounds]
    assert all(len(g) == 1 for g in group_of)  # each round: ranks of one group of consecutive ranks (a node's)
    order = [min(g) for g in group_of]
    assert order == sorted(order) and set(order) == set(range(-(-len(senders) // MAX_ROUND_PEERS)))
    unbounded = check_plan(layout, 2, dst=0, peers=world)  # the plan without the bound: 2 rounds of every sender
    assert len(unbounded.rounds) == 2 and max(len(r.sizes) for r in unbounded.rounds) == world - 1
    assert plan.stats()["received_bytes"] == unbounded.stats()["received_bytes"]
    assert plan.stats()["peak_extra_bytes"] <= unbounded.stats()["peak_extra_bytes"]
