"""How `save_merged` moves data: the LoRA factors to every rank (`full_factors`), each rank's merged runs
(`MergedRuns`, merged on `MERGE_DEVICE` where the base runs are held), one saved tensor at a time to the writer
(`Exchange`), and the streaming write, in which the writer writes each file in order as the tensors arrive
(`stream`). Every step at which one rank may fail alone is agreed before the next collective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from shardsave.errors import SaveError
from shardsave.merged.planning import MergedPlan, model_files
from shardsave.plan.merge_steps import Step
from shardsave.ranks.collect import Collector, DerivedCollector, TensorInfo
from shardsave.ranks.collect.sharded import comm_device
from shardsave.ranks.handshake import await_writer, run_gather, writer_done
from shardsave.ranks.rendezvous import Rendezvous
from shardsave.storage.local import publish
from shardsave.storage.streaming import write_streaming
from shardsave.tensors.merge_math import merge_tensor

__all__ = ["MERGE_DEVICE", "merge_on", "MergedRuns", "full_factors", "Exchange", "stream", "write_error"]

#: Where `save_merged` merges, on every backend (see `shardsave.merged.live` for why).
MERGE_DEVICE = torch.device("cpu")


def merge_on(
    device: torch.device,
    base: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    steps: list[Step],
    tensors: Mapping[tuple[str, str], torch.Tensor],
    *,
    start: int = 0,
) -> torch.Tensor:
    """`merge_tensor` of elements `[start, start + base.numel())` on `device`, into a fresh buffer of `dtype`:
    the base run and every adapter tensor the steps use are moved there first (a run may sit on a GPU while the
    factors are on the host), so the result, and its bits, depend on `device` alone."""
    out = base.detach().to(device=device, dtype=dtype, copy=True)
    used = {(s.adapter, t) for s in steps for t in s.tensors.values()}
    moved = {pair: t.to(device) for pair, t in tensors.items() if pair in used}
    return merge_tensor(out, shape, steps, moved, start=start)


class MergedRuns:
    """The merged values of the saved tensors, as runs held where the base runs are (`collector`, a
    `DerivedCollector` over the live model's): reading this rank's run of a base tensor merges it into a fresh
    buffer (never the live one), on `MERGE_DEVICE`. A merge that fails records its error (`error`) and gives zeros
    from then on, so that this rank still takes its part in every collective; the error is agreed after them
    (nothing is published)."""

    def __init__(self, merged: MergedPlan, tensors: dict[tuple[str, str], torch.Tensor], rank: int, world_size: int):
        self.merged = merged
        self.tensors = tensors
        self.rank = rank
        self.device = MERGE_DEVICE
        self.error: SaveError | None = None
        inner = merged.collector
        live = inner.infos()
        infos = {}
        for key, spec in merged.specs.items():
            dtype = live[merged.sources[key]].dtype if key in merged.whole_on_writer else spec.dtype
            infos[key] = TensorInfo(spec.shape, dtype, False)
        self.collector = DerivedCollector(inner, infos, merged.sources, self._merge, rank, world_size)

    def _merge(self, key: str, run: torch.Tensor, start: int) -> torch.Tensor:
        spec = self.merged.specs[key]
        if key in self.merged.whole_on_writer:
            return run
        if not self.merged.steps[key]:  # unchanged: read where it is (cast if asked), never written to
            return run.to(spec.dtype)
        return self._guarded(key, run.numel(), lambda: merge_on(
            self.device, run, spec.shape, spec.dtype, self.merged.steps[key], self.tensors, start=start
        ).reshape(-1))  # fmt: skip

    def finish(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The writer's last step on a gathered tensor: a DoRA tensor that travelled unmerged is merged whole."""
        spec = self.merged.specs[key]
        if key not in self.merged.whole_on_writer:
            return tensor
        return self._guarded(key, tensor.numel(), lambda: merge_on(
            self.device, tensor, spec.shape, spec.dtype, self.merged.steps[key], self.tensors
        )).reshape(spec.shape)  # fmt: skip

    def _guarded(self, key: str, numel: int, merge) -> torch.Tensor:
        """`merge()`, or zeros of its size once a merge on this rank failed (the first error is kept)."""
        if self.error is None:
            try:
                return merge()
            except Exception as exc:
                self.error = SaveError(
                    f"shardsave.save_merged: rank {self.rank} failed merging {key}: {type(exc).__name__}: {exc}. "
                    f"Nothing was published."
                )
                self.error.__cause__ = exc
        return torch.zeros(numel, dtype=self.merged.specs[key].dtype)


def full_factors(merged: MergedPlan, writer: int, rdv: Rendezvous) -> dict[tuple[str, str], torch.Tensor]:
    """Every LoRA factor / delta a step uses, full, on every rank, on `MERGE_DEVICE`: gathered to the writer,
    then broadcast."""
    collector = merged.collector
    names = list(dict.fromkeys(merged.factors.values()))
    if not names:
        return {}
    if collector.backend == "local" or not rdv.ranks.distributed:
        full = {n: collector.whole(n).detach() for n in names}
    else:
        full = _gather_factors(collector, names, writer, rdv)
    return {pair: full[name].to(MERGE_DEVICE) for pair, name in merged.factors.items()}


def _gather_factors(collector: Collector, names: list[str], writer: int, rdv: Rendezvous) -> dict[str, torch.Tensor]:
    """The factors gathered to the writer and broadcast from it. What can fail on one rank alone (reading its
    pieces, the writer's receive buffers, the broadcast buffer; the gather itself) is agreed before the next
    collective: else a rank that failed would leave the others in a gather or a broadcast nobody else is in."""
    plan = collector.plan(names, writer)
    transfer, buffer, error = None, None, None
    try:
        transfer = collector.prepare_gather(names, writer)
        buffer = torch.empty(max(plan.total, 1), dtype=torch.uint8, device=comm_device(torch.device("cpu")))
    except Exception as exc:
        error = SaveError(f"shardsave.save_merged: rank {rdv.ranks.rank} could not prepare the gather of the LoRA "
                          f"factors: {type(exc).__name__}: {exc}. Nothing was written.")  # fmt: skip
        error.__cause__ = exc
    rdv.agree("factors", {}, own=error)
    error = run_gather(transfer, writer, rdv)[1]
    if error is None and rdv.ranks.rank == writer:
        buffer[: plan.total].copy_(transfer.output[: plan.total])
    rdv.agree("factors-gathered", {}, own=error)
    dist.broadcast(buffer, src=writer)
    packed = buffer.cpu()
    full = {}
    for name in names:
        info = collector.infos()[collector.primary(name)]
        offset = plan.offsets[collector.primary(name)]
        nbytes = math.prod(info.shape) * info.dtype.itemsize
        full[name] = packed[offset : offset + nbytes].view(info.dtype).view(info.shape)
    return full


class Exchange:
    """One saved tensor, whole, to the writer (its merged runs gathered, or its whole copy read there). Once an
    exchange failed (a peer died or hangs), `broken` says so and no further one is tried: each would wait the
    timeout again."""

    def __init__(self, runs: MergedRuns, writer: int, rdv: Rendezvous, sharded: bool):
        self.runs, self.writer, self.rdv, self.sharded = runs, writer, rdv, sharded
        self.broken = False

    def __call__(self, key: str) -> torch.Tensor | None:
        runs, on_writer = self.runs, self.rdv.ranks.rank == self.writer
        if self.broken:
            raise SaveError(f"shardsave.save_merged: rank {self.rdv.ranks.rank}: an earlier exchange failed.")
        if not self.sharded or runs.collector.slices(key) is None:
            return runs.finish(key, runs.collector.whole(key).view(runs.merged.specs[key].shape)) if on_writer else None
        try:
            transfer = runs.collector.prepare_gather([key], self.writer)
        except Exception:
            self.broken = True
            raise
        out, error = run_gather(transfer, self.writer, self.rdv)
        if error is not None:
            self.broken = True
            raise error
        return runs.finish(key, out[key]) if on_writer else None


def stream(
    rdv: Rendezvous, merged: MergedPlan, runs: MergedRuns, order, writer: int, destination: Path, exchange: Exchange
) -> None:
    """The merged tensors stream to the writer one at a time, which writes each file in order; once every rank has
    taken its part, all agree on every rank's merges before the writer publishes."""
    ranks = rdv.ranks
    if ranks.rank != writer:
        error = None
        for _, key in order:
            try:
                exchange(key)
            except Exception as exc:
                error = exc
                break
        rdv.agree("written", {}, own=error or runs.error)
        await_writer(rdv, writer)
        return
    done, agreed = 0, False

    def produce(key: str) -> torch.Tensor:
        nonlocal done
        tensor = exchange(key)
        done += 1
        return tensor

    def fill(tmp: Path) -> None:
        nonlocal agreed
        model_files(tmp, merged)
        for filename, keys in merged.files.items():
            specs = {k: merged.specs[k] for k in keys}
            write_streaming(tmp / filename, specs, produce, metadata={"format": "pt"})
        agreed = True
        rdv.agree("written", {}, own=runs.error)  # every rank merged its runs: else nothing is published

    error = None
    with rdv.heartbeat():
        try:
            publish(destination, fill)
        except Exception as exc:
            error = write_error(exc, ranks.rank, destination)
            if not agreed:
                for _, key in order[done:]:  # the others are sending: take part in every remaining exchange
                    try:
                        exchange(key)
                    except Exception:
                        break
                try:
                    rdv.agree("written", {}, own=error)
                except Exception:
                    pass
    writer_done(rdv, error)


def write_error(exc: Exception, rank: int, where: Path) -> Exception:
    """An OS error while writing, as the `SaveError` every rank reports; anything else as it is."""
    if not isinstance(exc, OSError):
        return exc
    error = SaveError(f"shardsave.save_merged: rank {rank} writing into {where} failed: {type(exc).__name__}: "
                      f"{exc}. Nothing was published; choose a writable save_directory with free space.")  # fmt: skip
    error.__cause__ = exc
    return error
