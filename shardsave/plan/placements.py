"""Which elements of a tensor each rank holds under any DTensor placement on any mesh: pure arithmetic.

A DTensor on an N-D mesh applies its placements left to right, one per mesh dimension: `Shard(d)` splits
dimension `d` into `torch.chunk`-sized pieces and keeps the rank's; `_StridedShard(d, split_factor=s)` (what
FSDP2 puts on top of tensor parallelism) first splits `d` into `s` pieces, splits each of those, and keeps the
rank's piece of each; `Replicate` keeps everything. Each tensor dimension is therefore cut independently, so
what a rank holds is a box: per dimension, a list of index intervals, and its local tensor is that box in
row-major order. From the box come the runs of the flattened tensor the rank holds (`Slice`s), and from all
ranks' boxes the replicas (ranks with equal boxes) and one sender per run. `Partial` is not a layout of
values and is refused by the caller. Nothing here needs a process group.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from shardsave.plan.ranges import Slice

__all__ = ["Spec", "DimSplit", "box_of", "box_runs", "Holding", "holding_of", "spec_of", "nested_ranks"]

Interval = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Spec:
    """One placement, as plain data: `kind` "shard" / "strided" / "replicate", the tensor dim, the split factor."""

    kind: str
    dim: int = 0
    split_factor: int = 1


@dataclass(frozen=True, slots=True)
class DimSplit:
    """Placement `spec` applied on a mesh dimension of `size` ranks, at coordinate `index`."""

    spec: Spec
    size: int
    index: int


def _take(intervals: list[Interval], lo: int, hi: int) -> list[Interval]:
    """Positions `[lo, hi)` of the index sequence the intervals list, as intervals."""
    out, position = [], 0
    for a, b in intervals:
        n = b - a
        s, e = max(lo, position), min(hi, position + n)
        if s < e:
            out.append((a + s - position, a + e - position))
        position += n
        if position >= hi:
            break
    return out


def _chunk(length: int, parts: int, index: int) -> tuple[int, int]:
    """`torch.chunk`'s piece `index` of `length` in `parts` (empty past the end)."""
    size = -(-length // parts) if length else 0
    return min(index * size, length), min((index + 1) * size, length)


def _split(intervals: list[Interval], split: DimSplit) -> list[Interval]:
    length = sum(b - a for a, b in intervals)
    if split.spec.kind == "shard":
        return _take(intervals, *_chunk(length, split.size, split.index))
    # strided: `split_factor` pieces first, then the rank's chunk of each, in order
    out = []
    for j in range(split.spec.split_factor):
        lo, hi = _chunk(length, split.spec.split_factor, j)
        piece = _take(intervals, lo, hi)
        a, b = _chunk(hi - lo, split.size, split.index)
        out += _take(piece, a, b)
    return out


def box_of(shape: Sequence[int], splits: Sequence[DimSplit]) -> list[list[Interval]]:
    """Per tensor dimension, the index intervals one rank holds (in increasing order)."""
    box = [[(0, n)] if n else [] for n in shape]
    for split in splits:
        if split.spec.kind == "replicate":
            continue
        d = split.spec.dim
        box[d] = _split(box[d], split)
    return box


def box_runs(shape: Sequence[int], box: list[list[Interval]]) -> list[tuple[int, int]]:
    """The runs `(start, stop)` of the flattened tensor a box holds, in its local (row-major) order; adjacent
    runs are merged, so a box of whole trailing dimensions is one run per leading index."""
    if not shape:
        return [(0, 1)]
    if any(not intervals for intervals in box):
        return []
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    # the trailing dimensions held whole fold into the last partial one
    last = len(shape) - 1
    while last > 0 and box[last] == [(0, shape[last])]:
        last -= 1
    tail = strides[last]
    runs: list[tuple[int, int]] = []

    def walk(d: int, base: int) -> None:
        for a, b in box[d]:
            if d == last:
                start, stop = base + a * tail, base + b * tail
                if runs and runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], stop)
                else:
                    runs.append((start, stop))
            else:
                for i in range(a, b):
                    walk(d + 1, base + i * strides[d])

    walk(0, 0)
    return runs


@dataclass(frozen=True, slots=True)
class Holding:
    """Who holds what of one tensor: each rank's runs with their element offset in its local tensor, and the
    replica groups (ranks holding the same elements, in rank order)."""

    held: dict[int, tuple[tuple[Slice, int], ...]]
    replicas: tuple[tuple[int, ...], ...]

    def senders(self, shift: int = 0) -> list[Slice]:
        """One sender per run: of each replica group the member at `shift` modulo its size (a per-tensor
        `shift` spreads the tensors over the replicas), in element order."""
        out = [s for group in self.replicas for s, _ in self.held[group[shift % len(group)]]]
        return sorted(out, key=lambda s: s.start)


@functools.lru_cache(maxsize=4096)
def holding_of(shape: tuple[int, ...], mesh: tuple, specs: tuple[Spec, ...]) -> Holding:
    """The holding of a tensor of global `shape` under `specs` (one per mesh dimension) on `mesh` (nested tuples
    of global ranks). Checks that the ranks together hold every element (memoized: a model repeats a few
    layouts many times)."""
    dims = _mesh_shape(mesh)
    if len(specs) != len(dims):
        raise ValueError(f"{len(specs)} placements for a mesh of {len(dims)} dimensions.")
    boxes: dict[tuple, list[int]] = {}
    held: dict[int, tuple[tuple[Slice, int], ...]] = {}
    for coord in itertools.product(*(range(n) for n in dims)):
        rank = _at(mesh, coord)
        box = box_of(shape, [DimSplit(s, n, i) for s, n, i in zip(specs, dims, coord, strict=True)])
        offset, mine = 0, []
        for start, stop in box_runs(shape, box):
            mine.append((Slice(rank, start, stop), offset))
            offset += stop - start
        held[rank] = tuple(mine)
        boxes.setdefault(tuple(tuple(iv) for iv in box), []).append(rank)
    holding = Holding(held, tuple(tuple(sorted(g)) for g in boxes.values()))
    position = 0
    for s in holding.senders():
        if s.start != position:
            raise ValueError(f"placements {list(specs)} leave elements {position}..{s.start} of {list(shape)} unheld.")
        position = s.stop
    if position != math.prod(shape):
        raise ValueError(f"placements {list(specs)} hold {position} of {math.prod(shape)} elements of {list(shape)}.")
    return holding


def _mesh_shape(mesh) -> list[int]:
    dims = []
    while isinstance(mesh, list | tuple):
        dims.append(len(mesh))
        mesh = mesh[0]
    return dims


def _at(mesh, coord: Sequence[int]) -> int:
    for i in coord:
        mesh = mesh[i]
    return int(mesh)


def spec_of(placement) -> Spec | None:
    """The `Spec` of a DTensor placement (`Shard`, `_StridedShard`, `Replicate`), None for any other (`Partial`
    holds no values to read): the one reading of torch's placement types, for live DTensors and for the ones an
    FSDP checkpoint file holds. torch is imported here only, so the arithmetic above stays importable alone."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(placement, _StridedShard):  # a subclass of Shard: first
        return Spec("strided", placement.dim, int(placement.split_factor))
    if isinstance(placement, Shard):
        return Spec("shard", placement.dim)
    if isinstance(placement, Replicate):
        return Spec("replicate")
    return None


def nested_ranks(mesh) -> tuple:
    """A device mesh's rank grid (`DeviceMesh.mesh.tolist()`, nested lists) as the nested tuples `holding_of` takes."""
    return tuple(nested_ranks(m) for m in mesh) if isinstance(mesh, list) else int(mesh)
