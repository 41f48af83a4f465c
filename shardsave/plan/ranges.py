"""Who holds which element range of each tensor, and how those ranges travel: pure functions over metadata.

Every sharding backend describes a tensor as `Slice`s: element ranges `[start, stop)` of the flattened full
tensor, each held by one global rank (replicas resolved by the backend to one holder). From that alone, every
rank computes the same `TransferPlan` for moving the selected tensors to one destination rank: which slices
move, in which round, at which byte offset of the sender's packed buffer and of the destination's packed
output. No rank asks another; the plan is what the gather, the per-rank shards and the scale benchmark all
read, so the cost figures in `stats` are the ones the executor really incurs. Loading reads the same slices
the other way: `read_items` intersects what a rank holds with the runs a tensor was saved in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Slice",
    "Piece",
    "Round",
    "TransferPlan",
    "chunk_ranges",
    "round_budget",
    "plan_transfer",
    "ReadItem",
    "read_items",
    "prefer_holder",
    "MAX_ROUND_BYTES",
    "MAX_ROUND_PEERS",
    "peer_groups",
]

ALIGN = 16  # bytes; each tensor starts aligned in the packed output so that it can be viewed as its dtype
MAX_ROUND_BYTES = 256 * 2**20  # the destination never receives more than this in one round
#: The destination never receives from more than this many ranks in one round. Each receive in flight uses a
#: per-peer buffer of the communicator (NCCL: a few MB per peer and channel), so an all-to-one gather from 511
#: peers at once needs GBs on the writer's GPU together; in groups of 64, at most 64 peers' worth at a time. (NCCL
#: may keep a connection's buffers once it is set up; bounding those too needs a two-level gather per node.)
MAX_ROUND_PEERS = 64


@dataclass(frozen=True, slots=True)
class Slice:
    """Elements `[start, stop)` of the flattened full tensor, held by `rank` (a global rank)."""

    rank: int
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of one slice, moved in one round: elements `[start, stop)` of tensor `name` from `rank`.

    `src_offset` is its byte offset in the sender's packed buffer for the round (pieces of one sender are
    packed back to back, no padding); `dst_offset` its byte offset in the destination's packed output."""

    name: str
    rank: int
    start: int
    stop: int
    src_offset: int
    dst_offset: int

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class Round:
    """One exchange: every sender in `sizes` sends exactly `sizes[rank]` bytes to the destination."""

    pieces: tuple[Piece, ...]
    sizes: dict[int, int]

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """Moving `names` to rank `dst`: where each tensor lands in the packed output, what `dst` already holds
    (`own`, copied locally), and the rounds of what others send."""

    dst: int
    offsets: dict[str, int]  # byte offset of each tensor in the packed output
    total: int  # bytes of the packed output
    own: tuple[Piece, ...]  # pieces `dst` holds itself (including tensors every rank holds whole)
    rounds: tuple[Round, ...]

    def sends(self, rank: int) -> list[tuple[int, list[Piece]]]:
        """`(round index, pieces)` for every round in which `rank` sends something."""
        return [(i, [p for p in r.pieces if p.rank == rank]) for i, r in enumerate(self.rounds) if rank in r.sizes]

    def stats(self) -> dict[str, int]:
        """What executing the plan costs the destination: bytes received in all and in the largest round,
        receive messages, copy operations (one per round, plus one for its own pieces), and its peak extra
        memory (the packed output plus the largest round's receive buffer)."""
        largest = max((r.nbytes for r in self.rounds), default=0)
        return {
            "received_bytes": sum(r.nbytes for r in self.rounds),
            "largest_round_bytes": largest,
            "rounds": len(self.rounds),
            "messages": sum(len(r.sizes) for r in self.rounds),
            "copy_ops": len(self.rounds) + (1 if self.own else 0),
            "output_bytes": self.total,
            "peak_extra_bytes": self.total + largest,
        }


def chunk_ranges(length: int, parts: int) -> list[tuple[int, int]]:
    """`torch.chunk`'s split of `range(length)` into `parts` (trailing parts may be empty)."""
    size = -(-length // parts) if length else 0
    return [(min(i * size, length), min((i + 1) * size, length)) for i in range(parts)]


def round_budget(moved_bytes: int) -> int:
    """Most bytes the destination receives in one round: half of what moves (slices are split to fit), at
    most `MAX_ROUND_BYTES`, so that its peak stays under 1.5x the adapter (the packed output, plus one
    round's receive buffer) whatever the number of ranks."""
    return max(1, min(-(-moved_bytes // 2), MAX_ROUND_BYTES))


def peer_groups(senders: Sequence[int], most: int) -> dict[int, int]:
    """Each sender's group: consecutive ranks, `most` to a group, in rank order (the ranks of a node together,
    where ranks are numbered by node)."""
    return {rank: i // most for i, rank in enumerate(sorted(set(senders)))}


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def plan_transfer(
    layout: Mapping[str, Sequence[Slice] | None],
    itemsizes: Mapping[str, int],
    numels: Mapping[str, int],
    dst: int,
    *,
    budget: int | None = None,
    peers: int | None = None,
) -> TransferPlan:
    """The plan for moving the tensors of `layout` (name -> its slices, or `None` when every rank holds it
    whole) to rank `dst`. Tensors keep `layout`'s order in the output; slices move in order, split at the
    round budget (in whole elements), so a round never carries more than `budget` bytes (`round_budget` by
    default), and from at most `peers` senders (`MAX_ROUND_PEERS` by default): senders are taken in groups of
    `peers` consecutive ranks (`peer_groups`), each group's slices in rounds of its own. Pure: every rank gets
    the same plan from the same metadata.

    What the peer bound costs: at least `ceil(senders / peers)` rounds instead of 2 (16 at 1024 ranks), each a
    synchronisation of the writer with the slowest sender of its group; the bytes moved, the messages per
    sender and the writer's memory (output + one round) are unchanged. At 64 senders or fewer it changes nothing."""
    offsets, total = {}, 0
    for name in layout:
        offsets[name] = total
        total += _aligned(numels[name] * itemsizes[name])
    own: list[Piece] = []
    remote: list[tuple[str, Slice]] = []
    for name, slices in layout.items():
        if slices is None:
            own.append(Piece(name, dst, 0, numels[name], 0, offsets[name]))
            continue
        for s in slices:
            if s.stop <= s.start:
                continue
            if s.rank == dst:
                own.append(Piece(name, dst, s.start, s.stop, 0, offsets[name] + s.start * itemsizes[name]))
            else:
                remote.append((name, s))
    moved = sum((s.stop - s.start) * itemsizes[name] for name, s in remote)
    budget = round_budget(moved) if budget is None else budget
    group = peer_groups([s.rank for _, s in remote], MAX_ROUND_PEERS if peers is None else peers)
    remote.sort(key=lambda item: group[item[1].rank])  # stable: each group's slices in layout order
    rounds: list[Round] = []
    pieces: list[Piece] = []
    sizes: dict[int, int] = {}
    room = budget

    def close() -> None:
        nonlocal pieces, sizes, room
        if pieces:
            rounds.append(Round(tuple(pieces), sizes))
        pieces, sizes, room = [], {}, budget

    current = None
    for name, s in remote:
        if group[s.rank] != current:  # a new group of senders: a new round
            close()
            current = group[s.rank]
        item = itemsizes[name]
        start = s.start
        while start < s.stop:
            fit = min(s.stop - start, max(room, 0) // item)
            if fit == 0:
                if pieces:
                    close()
                    continue
                fit = 1  # an element larger than the budget still travels, alone
            used = sizes.get(s.rank, 0)
            pieces.append(Piece(name, s.rank, start, start + fit, used, offsets[name] + start * item))
            sizes[s.rank] = used + fit * item
            room -= fit * item
            start += fit
    close()
    return TransferPlan(dst, offsets, total, tuple(own), tuple(rounds))


@dataclass(frozen=True, slots=True)
class ReadItem:
    """Elements `[start, stop)` of a tensor found in run `run` of where it was saved, at element `offset` into
    that run: the load-side counterpart of a `Piece` (DCP calls it a read item)."""

    run: int
    offset: int
    start: int
    stop: int


def read_items(saved: Sequence[tuple[int, int]], start: int, stop: int) -> list[ReadItem]:
    """Where the elements `[start, stop)` a rank holds lie in the saved runs `(start, stop)` of the same flattened
    tensor (any N -> M resharding is this intersection). Raises `ValueError` when the runs leave a gap."""
    items, position = [], start
    for index, (lo, hi) in sorted(enumerate(saved), key=lambda item: item[1]):
        a, b = max(lo, position), min(hi, stop)
        if a < b:
            if a != position:
                break
            items.append(ReadItem(index, a - lo, a, b))
            position = b
    if position < stop:
        raise ValueError(f"elements [{position}, {stop}) are in none of the saved runs {list(saved)[:8]}")
    return items


def prefer_holder(slices: Sequence[Slice], held: Sequence[tuple[int, int]], rank: int) -> list[Slice]:
    """`slices` with `rank` as the sender of every run it holds a copy of (`held`: its runs): a replica the
    destination already has is read in place, never sent (HSDP's writer holds half of every tensor)."""
    mine = set(held)
    return [Slice(rank, s.start, s.stop) if (s.start, s.stop) in mine else s for s in slices]
