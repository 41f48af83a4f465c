"""The gather shared by every sharded backend: a `TransferPlan` (`shardsave.plan`) says which rank sends
which element ranges in which round; each sender packs its pieces of a round into one buffer and sends
exactly those bytes, point to point, to the writer, and nothing else moves. Rounds (see `round_budget`) keep
the writer's receive buffer to at most half the adapter.

FSDP1, FSDP2 and ZeRO-3 all hold a parameter as contiguous runs of its flattened elements, one run per
rank. A backend only says, for a tensor, which rank holds which element range (`slices`, computed from
metadata every rank has, so no rank needs to ask another) and how to read its own run (`local`). Tensors
held whole by the writer (buffers, unsharded or persistent parameters) are read in place and never sent.

Point-to-point sends that leave ranks out are defined on NCCL only once the group has run a collective (see
`torch.distributed.batch_isend_irecv`); an FSDP2 loop on a 2-D mesh runs collectives on its sub-groups only, so
the world group may never have. The first gather of a process therefore runs one 4-byte `all_reduce` on the
world group (`warm_world`), on every rank, before any send.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from shardsave.errors import TransferError
from shardsave.plan.ranges import Piece, Slice, TransferPlan, chunk_ranges, plan_transfer, prefer_holder
from shardsave.ranks.collect.base import TensorInfo

__all__ = [
    "Slice",
    "ShardedCollector",
    "Transfer",
    "TransferError",
    "comm_device",
    "pick_device",
    "chunk_ranges",
    "warm_world",
]


class ShardedCollector:
    """Base of the FSDP1, FSDP2 and ZeRO-3 collectors. Subclasses fill `_infos` and implement
    `slices`, `local` and `whole`."""

    backend = "sharded"

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self._infos: dict[str, TensorInfo] = {}
        self._aliases: dict[str, str] = {}  # tied name -> the name whose tensor it shares
        self._held: dict[str, list[Slice] | None] = {}  # slices, once per tensor and save

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def _register(self, root, full_shape) -> None:
        """Record every state-dict entry of `root` (tied names as aliases of the first), with its full shape
        as `full_shape(tensor)` reports it."""
        from shardsave.ranks.collect.walk import state_entries

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

    def infos_of(self, name: str) -> TensorInfo:
        return self._infos[name]

    def slices(self, name: str) -> list[Slice] | None:
        """Who holds which part of `name`; `None` when every rank holds it whole (computed once per tensor)."""
        if name not in self._held:
            self._held[name] = self._slices(name)
        return self._held[name]

    def own(self, name: str) -> list[Slice]:
        """The element ranges of a sharded `name` this rank holds, whether it sends them or holds replicas (a load
        writes every copy); empty when it holds none of it, or every rank holds it whole."""
        return [s for s in self.slices(name) or () if s.rank == self.rank and s.stop > s.start]

    def replicated(self, name: str) -> bool:
        """Whether some run of a sharded `name` is held by more than one rank (one of them sends it)."""
        return False

    def held_by(self, name: str, rank: int) -> list[tuple[int, int]]:
        """The runs of a sharded `name` that `rank` holds (from metadata: no rank is asked); for replicas only
        (without them, every run has its one holder in `slices`)."""
        return []

    def holders(self, name: str, run: Slice) -> tuple[int, ...]:
        """The ranks (this one among them) holding copies of this rank's `run` of a replicated `name`, from
        metadata: its replica group. O(world size) here; the backends answer from the groups they know."""
        mine = (run.start, run.stop)
        return tuple(r for r in range(self.world_size) if mine in self.held_by(name, r))

    def _to(self, name: str, dst: int) -> list[Slice] | None:
        """`slices(name)` for a gather to `dst`: where `dst` holds a replica of a run, it sends it to itself."""
        slices = self.slices(name)
        if slices is None or not self.replicated(name):
            return slices
        return prefer_holder(slices, self.held_by(name, dst), dst)

    # -- what a backend provides -------------------------------------------------------------------
    def _slices(self, name: str) -> list[Slice] | None:
        """`slices`, computed from the backend's metadata."""
        raise NotImplementedError

    def local(self, name: str, piece: Slice) -> torch.Tensor:
        """This rank's elements `[piece.start, piece.stop)` of `name`, as a 1-D tensor."""
        raise NotImplementedError

    def whole(self, name: str) -> torch.Tensor:
        """The full tensor `name`, where this rank holds it whole."""
        raise NotImplementedError

    # -- the gather --------------------------------------------------------------------------------
    def plan(self, names: Sequence[str], dst: int, *, budget: int | None = None) -> TransferPlan:
        """The transfer plan for `names` to `dst` (pure: the same on every rank)."""
        primaries = list(dict.fromkeys(self._aliases.get(n, n) for n in names))
        layout = {n: self._to(n, dst) for n in primaries}
        itemsizes = {n: self._infos[n].dtype.itemsize for n in primaries}
        numels = {n: math.prod(self._infos[n].shape) for n in primaries}
        return plan_transfer(layout, itemsizes, numels, dst, budget=budget)

    def prepare_gather(self, names: Sequence[str], dst: int, *, budget: int | None = None) -> Transfer:
        """Plan the gather and, on `dst`, allocate its buffers now: an out-of-memory is then an error of the
        planning step, which all ranks agree on, rather than a gather that the others wait for."""
        return Transfer(self, list(names), self.plan(names, dst, budget=budget))

    def gather(self, names: Sequence[str], dst: int, *, timeout: float | None = None) -> dict[str, torch.Tensor]:
        return self.prepare_gather(names, dst).run(timeout)

    def _local_piece(self, piece: Piece) -> torch.Tensor:
        """This rank's elements of `piece` as bytes (a view where the backend's storage allows)."""
        name = piece.name
        held = self.slices(name)
        if held is None:
            data = self.whole(name).detach().reshape(-1)[piece.start : piece.stop]
        else:
            # one of this rank's runs: one it sends, or a replica it holds itself (it is the destination)
            runs = [s for s in held if s.rank == self.rank] + self.own(name)
            mine = next(s for s in runs if s.start <= piece.start and piece.stop <= s.stop)
            run = self.local(name, mine).detach()
            data = run[piece.start - mine.start : piece.stop - mine.start]
        return data.contiguous().view(torch.uint8)


def comm_device(like: torch.device) -> torch.device:
    """Where this rank's buffers must live to go through the default process group (see `pick_device`)."""
    if not dist.is_initialized():
        return like
    group = dist.group.WORLD
    supported = {d.type for d in getattr(group, "_device_types", ())}
    if not supported:
        supported = {"cuda"} if "nccl" in str(dist.get_backend()) else {"cpu"}
    current = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    return pick_device(like, supported, getattr(group, "bound_device_id", None), current)


def pick_device(
    like: torch.device, supported: set[str], bound: torch.device | None, current_cuda: torch.device | None
) -> torch.device:
    """The shards' own device `like` when the group's backends can move tensors there (gloo: CPU; NCCL:
    CUDA; xccl, hccl: theirs), so that CPU-offloaded shards on a `cpu:gloo,cuda:nccl` group never touch a GPU
    and each rank uses the GPU its shards are on, whatever `torch.cuda.set_device` says. Otherwise the
    group's bound device (`init_process_group(device_id=...)`), else the current CUDA device, else the CPU."""
    if like.type in supported:
        return like
    if bound is not None:
        return bound
    if "cuda" in supported and current_cuda is not None:
        return current_cuda
    return torch.device("cpu")


_warmed: weakref.WeakSet = weakref.WeakSet()  # world groups that ran warm_world's collective in this process


def warm_world(wait: Callable[[list], None]) -> bool:
    """Run one collective on the world group, once per process and group, so that the point-to-point sends that
    follow are defined on NCCL even where only sub-groups ran collectives before. Every rank of a gather calls it
    at the same point (the plan is the same on every rank). On a group with an NCCL backend the tensor is on the
    GPU (NCCL's communicator is the one to warm, whatever device the shards are on); else on the CPU. `wait`
    waits for the work (bounded by the gather's timeout). Returns whether it ran."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return False
    group = dist.group.WORLD
    if group in _warmed:
        return False
    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        current = torch.device("cuda", torch.cuda.current_device())
        device = pick_device(device, {"cuda"}, getattr(group, "bound_device_id", None), current)
    wait([dist.all_reduce(torch.zeros(1, dtype=torch.int32, device=device), async_op=True)])
    _warmed.add(group)
    return True


def _empty(nbytes: int, device: torch.device, *, pinned: bool = False) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pinned)


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Every `src[i]` into `dst[i]` in one operation (a fused multi-tensor copy on GPU)."""
    if dst:
        torch._foreach_copy_(dst, src)


class Transfer:
    """Executes a `TransferPlan`: senders pack their pieces for a round into one buffer and send exactly
    those bytes to the destination (point to point: ranks holding nothing of a round take no part), which
    receives each round into one buffer and copies its pieces into place in one operation. The destination
    assembles everything in one packed host buffer (pinned when the buffers are on a GPU), so the device
    holds at most one round; it allocates all of this when the transfer is prepared."""

    def __init__(self, collector: ShardedCollector, names: list[str], plan: TransferPlan):
        self.collector = collector
        self.names = names
        self.plan = plan
        self.rank = collector.rank
        self._sends = plan.sends(self.rank)
        pieces = plan.own if self.rank == plan.dst else [p for _, ps in self._sends for p in ps]
        self._local = [collector._local_piece(p) for p in pieces]  # read now, while planning
        device = self._local[0].device if self._local else torch.device("cpu")
        self.device = comm_device(device)
        if self.rank == plan.dst:
            largest = max((r.nbytes for r in plan.rounds), default=0)
            on_gpu = self.device.type != "cpu"
            self.output = _empty(max(plan.total, 1), torch.device("cpu"), pinned=on_gpu)
            self._recv = _empty(largest, self.device) if largest else None
            self._staging = _empty(largest, torch.device("cpu"), pinned=True) if largest and on_gpu else None

    def run(self, timeout: float | None) -> dict[str, torch.Tensor]:
        """Every rank calls it; the full tensors (CPU, packed) on the destination, `{}` elsewhere. Each round
        is bounded by `timeout` on its own, so a healthy gather of many rounds is never cut short."""

        def deadline() -> float | None:
            return None if timeout is None else time.monotonic() + timeout

        if self.plan.rounds:  # the same on every rank: all of them warm the world group, or none
            warm_world(lambda works: self._wait(works, deadline(), "warming up the world group (one all_reduce)"))
        if self.rank != self.plan.dst:
            local = iter(self._local)
            for index, pieces in self._sends:
                self._send(index, [next(local) for _ in pieces], deadline())
            return {}
        self._place(self.plan.own, self._local)
        for index, round_ in enumerate(self.plan.rounds):
            received = self._receive(index, deadline())
            bases, base = {}, 0
            for sender in sorted(round_.sizes):
                bases[sender] = base
                base += round_.sizes[sender]
            srcs = [received[bases[p.rank] + p.src_offset :][: p.count * self._itemsize(p)] for p in round_.pieces]
            self._place(round_.pieces, srcs)
        return self._views()

    def _itemsize(self, piece: Piece) -> int:
        return self.collector.infos_of(piece.name).dtype.itemsize

    def _place(self, pieces, srcs: list[torch.Tensor]) -> None:
        """Copy `srcs` (bytes of `pieces`) into the packed output: one host copy, after one device-to-host
        copy of everything on a device."""
        if not pieces:
            return
        if any(s.device.type != "cpu" for s in srcs):
            host = torch.cat(srcs).cpu() if len(srcs) > 1 else srcs[0].cpu()
            srcs, at = [], 0
            for p in pieces:
                n = p.count * self._itemsize(p)
                srcs.append(host[at : at + n])
                at += n
        _copy_all([self.output[p.dst_offset :][: len(s)] for p, s in zip(pieces, srcs, strict=True)], srcs)

    def _wait(self, works, deadline: float | None, what: str) -> None:
        for work in works:
            try:
                if deadline is None:
                    work.wait()
                else:
                    work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
            except Exception as exc:
                raise TransferError(f"{what}: {type(exc).__name__}: {exc}") from exc

    def _send(self, index: int, pieces: list[torch.Tensor], deadline: float | None) -> None:
        """Send this rank's pieces of round `index`, packed, to the destination."""
        buffer = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).to(self.device)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, buffer, self.plan.dst)])
        self._wait(works, deadline, f"sending round {index} to rank {self.plan.dst}")

    def _receive(self, index: int, deadline: float | None) -> torch.Tensor:
        """Round `index` from every sender into one buffer (on the host when the buffer is on a device)."""
        round_ = self.plan.rounds[index]
        buffer = self._recv[: round_.nbytes]
        ops, at = [], 0
        for sender in sorted(round_.sizes):
            ops.append(dist.P2POp(dist.irecv, buffer[at : at + round_.sizes[sender]], sender))
            at += round_.sizes[sender]
        senders = sorted(round_.sizes)
        self._wait(dist.batch_isend_irecv(ops), deadline, f"receiving round {index} from ranks {senders}")
        if self._staging is None:
            return buffer
        staging = self._staging[: round_.nbytes]
        staging.copy_(buffer)
        return staging

    def _views(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, offset in self.plan.offsets.items():
            info = self.collector.infos_of(name)
            numel = math.prod(info.shape)
            out[name] = self.output[offset : offset + numel * info.dtype.itemsize].view(info.dtype).view(info.shape)
        return {n: out[self.collector.primary(n)] for n in self.names}
