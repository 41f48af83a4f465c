"""The gather shared by every sharded backend: each rank's slices of the selected tensors travel packed
into one buffer per round, by `gather` to the writer, and nothing else moves. Rounds (a few; see
`round_budget`) keep the writer's receive buffers to about half the adapter.

FSDP1, FSDP2 and ZeRO-3 all hold a parameter as contiguous runs of its flattened elements, one run per
rank. A backend only says, for a tensor, which rank holds which element range (`slices`, computed from
metadata every rank has, so no rank needs to ask another) and how to read its own run (`local`). Tensors
held whole by the writer (buffers, unsharded or persistent parameters) are read in place and never sent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .base import TensorInfo

__all__ = ["Slice", "Move", "ShardedCollector", "comm_device", "chunk_ranges", "plan_rounds", "round_budget"]

_ALIGN = 16  # bytes; every slice starts aligned so that it can be viewed back as its dtype
_MIN_ROUND = 2**20
_MAX_ROUND_TOTAL = 256 * 2**20


@dataclass(frozen=True, slots=True)
class Slice:
    """Elements `[start, stop)` of the flattened full tensor, held by `rank`."""

    rank: int
    start: int
    stop: int


def chunk_ranges(length: int, parts: int) -> list[tuple[int, int]]:
    """`torch.chunk`'s split of `range(length)` into `parts` (trailing parts may be empty)."""
    size = -(-length // parts) if length else 0
    return [(min(i * size, length), min((i + 1) * size, length)) for i in range(parts)]


def comm_device() -> torch.device:
    """Where collective buffers must live for the default process group's backend."""
    backend = str(dist.get_backend()) if dist.is_initialized() else "gloo"
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class ShardedCollector:
    """Base of the FSDP1, FSDP2 and ZeRO-3 collectors. Subclasses fill `_infos` and implement
    `slices`, `local` and `whole`."""

    backend = "sharded"

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self._infos: dict[str, TensorInfo] = {}
        self._aliases: dict[str, str] = {}  # tied name -> the name whose tensor it shares

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def _register(self, root, full_shape) -> None:
        """Record every state-dict entry of `root` (tied names as aliases of the first), with its full shape
        as `full_shape(tensor)` reports it."""
        from .walk import state_entries

        self._tensors: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for name, tensor, is_param in state_entries(root):
            if id(tensor) in seen:  # tied: gathered once, saved under both names
                self._aliases[name] = seen[id(tensor)]
            seen.setdefault(id(tensor), name)
            self._tensors[name] = tensor
            requires_grad = bool(tensor.requires_grad) and is_param
            self._infos[name] = TensorInfo(full_shape(tensor), tensor.dtype, requires_grad)

    def primary(self, name: str) -> str:
        """The name whose tensor `name` shares (tied weights), or `name` itself."""
        return self._aliases.get(name, name)

    # -- what a backend provides -------------------------------------------------------------------
    def slices(self, name: str) -> list[Slice] | None:
        """Who holds which part of `name`; `None` when every rank holds it whole."""
        raise NotImplementedError

    def local(self, name: str, piece: Slice) -> torch.Tensor:
        """This rank's elements `[piece.start, piece.stop)` of `name`, as a 1-D tensor."""
        raise NotImplementedError

    def whole(self, name: str) -> torch.Tensor:
        """The full tensor `name`, where this rank holds it whole."""
        raise NotImplementedError

    # -- the gather --------------------------------------------------------------------------------
    def gather(self, names: Sequence[str], dst: int, *, timeout: float | None = None) -> dict[str, torch.Tensor]:
        primaries = list(dict.fromkeys(self._aliases.get(n, n) for n in names))
        layout = {n: self.slices(n) for n in primaries}
        moves = [
            (name, piece, (piece.stop - piece.start) * self._infos[name].dtype.itemsize)
            for name in primaries
            for piece in layout[name] or ()
            if piece.rank != dst and piece.stop > piece.start
        ]
        rounds = plan_rounds(moves, self.world_size)
        if self.rank != dst:
            for moved in rounds:
                self._exchange(moved, dst, timeout)
            return {}

        device = comm_device()
        out: dict[str, torch.Tensor] = {}
        for name in primaries:
            info = self._infos[name]
            if layout[name] is None:
                out[name] = self.whole(name).detach()
                continue
            flat = torch.empty(math.prod(info.shape), dtype=info.dtype, device=device)
            for piece in layout[name]:
                if piece.rank == dst and piece.stop > piece.start:
                    flat[piece.start : piece.stop].copy_(self.local(name, piece))
            out[name] = flat
        for moved in rounds:
            received = self._exchange(moved, dst, timeout)
            for move in moved:
                name, piece = move.name, move.piece
                data = received[piece.rank][move.offset : move.offset + move.nbytes]
                out[name][piece.start : piece.stop].copy_(data.view(self._infos[name].dtype))
            del received
        out = {n: t if layout[n] is None else t.view(self._infos[n].shape) for n, t in out.items()}
        return {n: out[self._aliases.get(n, n)] for n in names}

    def _exchange(self, moved: list[Move], dst: int, timeout: float | None) -> list[torch.Tensor]:
        """One `gather` to `dst` of every rank's packed slices for one round."""
        sizes = [0] * self.world_size
        for move in moved:
            sizes[move.piece.rank] = max(sizes[move.piece.rank], move.offset + move.nbytes)
        device = comm_device()
        # padding and the writer's own (unused) contribution are never read: no need to zero them
        send = torch.empty(max(sizes), dtype=torch.uint8, device=device)
        for move in moved:
            if move.piece.rank == self.rank:
                data = self.local(move.name, move.piece).detach().contiguous().view(-1).view(torch.uint8)
                send[move.offset : move.offset + move.nbytes].copy_(data)
        bins = [torch.empty_like(send) for _ in range(self.world_size)] if self.rank == dst else None
        work = dist.gather(send, gather_list=bins, dst=dst, async_op=True)
        if timeout is None:
            work.wait()
        else:
            work.wait(timedelta(seconds=timeout))
        return bins or []


@dataclass(frozen=True, slots=True)
class Move:
    """One slice sent to the writer: `nbytes` at `offset` in its sender's buffer for the round."""

    name: str
    piece: Slice
    offset: int
    nbytes: int


def round_budget(moved_bytes: int, world_size: int) -> int:
    """Most bytes one rank sends in one round. The writer holds `world_size` receive buffers of this size
    beside the assembled tensors, so the budget keeps them to about half of what is moved (at least 1 MiB
    each, at most 256 MiB in all): the writer's peak stays under twice the adapter, and a big adapter moves
    in a few rounds rather than as one buffer per rank of its full size."""
    total = min(max(moved_bytes // 2, world_size * _MIN_ROUND), _MAX_ROUND_TOTAL)
    return max(total // world_size, _MIN_ROUND)


def plan_rounds(moves: list[tuple[str, Slice, int]], world_size: int, budget: int | None = None) -> list[list[Move]]:
    """Split `(name, piece, nbytes)` moves, in order, into gather rounds: a round closes when a sender's
    packed bytes would pass `budget` (a single larger slice travels alone). Pure: every rank computes the
    same rounds from the same metadata."""
    if budget is None:
        budget = round_budget(sum(nbytes for *_, nbytes in moves), world_size)
    rounds: list[list[Move]] = []
    current: list[Move] = []
    used = [0] * world_size
    for name, piece, nbytes in moves:
        if used[piece.rank] and used[piece.rank] + _aligned(nbytes) > budget:
            rounds.append(current)
            current, used = [], [0] * world_size
        current.append(Move(name, piece, used[piece.rank], nbytes))
        used[piece.rank] += _aligned(nbytes)
    if current:
        rounds.append(current)
    return rounds
