"""The gather shared by every sharded backend: each rank's slices of the selected tensors travel in one
packed buffer, in one `gather` to the writer, and nothing else moves.

FSDP1, FSDP2 and ZeRO-3 all hold a parameter as contiguous runs of its flattened elements, one run per
rank. A backend only says, for a tensor, which rank holds which element range (`slices`, computed from
metadata every rank has, so no rank needs to ask another) and how to read its own run (`local`). Tensors
held whole by the writer (buffers, unsharded or persistent parameters) are read in place and never sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .base import TensorInfo

__all__ = ["Slice", "ShardedCollector", "comm_device", "chunk_ranges"]

_ALIGN = 16  # bytes; every slice starts aligned so that it can be viewed back as its dtype


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
    def gather(self, names: Sequence[str], dst: int) -> dict[str, torch.Tensor]:
        primaries = list(dict.fromkeys(self._aliases.get(n, n) for n in names))
        layout = {n: self.slices(n) for n in primaries}
        offsets: dict[tuple[str, int], int] = {}
        sizes = [0] * self.world_size
        for name in primaries:
            itemsize = self._infos[name].dtype.itemsize
            for piece in layout[name] or ():
                if piece.rank != dst and piece.stop > piece.start:
                    offsets[(name, piece.start)] = sizes[piece.rank]
                    sizes[piece.rank] += _aligned((piece.stop - piece.start) * itemsize)

        received = self._exchange(primaries, layout, offsets, sizes, dst)
        if self.rank != dst:
            return {}
        device = comm_device()
        out: dict[str, torch.Tensor] = {}
        for name in primaries:
            info = self._infos[name]
            if layout[name] is None:
                out[name] = self.whole(name).detach()
                continue
            numel = 1
            for d in info.shape:
                numel *= d
            flat = torch.empty(numel, dtype=info.dtype, device=device)
            for piece in layout[name]:
                if piece.stop <= piece.start:
                    continue
                if piece.rank == dst:
                    flat[piece.start : piece.stop].copy_(self.local(name, piece))
                else:
                    begin = offsets[(name, piece.start)]
                    nbytes = (piece.stop - piece.start) * info.dtype.itemsize
                    flat[piece.start : piece.stop].copy_(received[piece.rank][begin : begin + nbytes].view(info.dtype))
            out[name] = flat.view(info.shape)
        return {n: out[self._aliases.get(n, n)] for n in names}

    def _exchange(self, primaries, layout, offsets, sizes, dst) -> list[torch.Tensor]:
        """One `gather` of every rank's packed slices to `dst` (skipped when nobody has to send)."""
        width = max(sizes)
        if width == 0:
            return []
        device = comm_device()
        send = torch.zeros(width, dtype=torch.uint8, device=device)
        for name in primaries:
            for piece in layout[name] or ():
                if piece.rank == self.rank and piece.rank != dst and piece.stop > piece.start:
                    data = self.local(name, piece).detach().contiguous().view(-1).view(torch.uint8)
                    begin = offsets[(name, piece.start)]
                    send[begin : begin + data.numel()].copy_(data)
        bins = [torch.empty_like(send) for _ in range(self.world_size)] if self.rank == dst else None
        dist.gather(send, gather_list=bins, dst=dst)
        return bins or []
