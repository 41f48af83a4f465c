"""Pure checks of shardsave.plan.placements against what DTensor itself does to a tensor of indices."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from shardsave.plan.placements import Spec, holding_of

CASES = [
    ((10, 6), [Shard(0)], 4),
    ((5, 7), [Shard(1)], 3),
    ((3, 4, 5), [Shard(1)], 2),
    ((9, 4), [Replicate(), Shard(0)], (2, 2)),  # HSDP
    ((8, 8), [_StridedShard(0, split_factor=2), Shard(0)], (2, 2)),  # FSDP2 over tensor parallelism
    ((13, 3), [_StridedShard(0, split_factor=2), Shard(0)], (2, 3)),  # uneven
    ((6, 10), [Shard(0), Shard(1)], (2, 2)),
    ((4, 6), [Shard(1), Shard(1)], (2, 2)),
    ((3,), [Shard(0)], 5),  # more ranks than elements
    ((2, 3), [Replicate(), Replicate()], (2, 2)),
]


def nested(ranks):
    return tuple(nested(r) for r in ranks) if isinstance(ranks, list) else ranks


def spec(p) -> Spec:
    if isinstance(p, _StridedShard):
        return Spec("strided", p.dim, int(p.split_factor))
    if isinstance(p, Shard):
        return Spec("shard", p.dim)
    return Spec("replicate")


def dtensor_indices(shape, placements, dims, coord) -> list[int]:
    """The global indices a rank's local tensor holds, in its order, as DTensor's own split computes them."""
    local = torch.arange(math.prod(shape)).view(shape)
    for p, n, i in zip(placements, dims, coord, strict=True):
        if isinstance(p, Shard | _StridedShard):
            chunks = p._split_tensor(local, n, with_padding=False)[0]
            local = chunks[i]
    return local.reshape(-1).tolist()


@pytest.mark.parametrize("shape, placements, dims", CASES)
def test_runs_are_what_dtensor_holds(shape, placements, dims):
    dims = (dims,) if isinstance(dims, int) else dims
    ranks = torch.arange(math.prod(dims)).view(dims).tolist()
    layout = holding_of(shape, nested(ranks), tuple(spec(p) for p in placements))
    for coord in itertools.product(*(range(n) for n in dims)):
        rank = int(torch.tensor(ranks)[coord].item()) if len(dims) > 1 else ranks[coord[0]]
        expanded, offset = [], 0
        for piece, local_offset in layout.held[rank]:
            assert local_offset == offset
            expanded += list(range(piece.start, piece.stop))
            offset += piece.stop - piece.start
        assert expanded == dtensor_indices(shape, placements, dims, coord), (coord, layout.held[rank])
    # every element sent once, by a rank that holds it
    senders = layout.senders(shift=1)
    covered = sorted(i for s in senders for i in range(s.start, s.stop))
    assert covered == list(range(math.prod(shape)))
    for s in senders:
        assert any(h.start <= s.start and s.stop <= h.stop for h, _ in layout.held[s.rank])


def test_replicas_spread_over_tensors():
    ranks = ((0, 1), (2, 3))  # (replicate, shard)
    specs = (Spec("replicate"), Spec("shard", 0))
    senders = {shift: {s.rank for s in holding_of((8, 2), ranks, specs).senders(shift)} for shift in range(2)}
    assert senders == {0: {0, 1}, 1: {2, 3}}
