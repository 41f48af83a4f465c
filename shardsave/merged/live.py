"""`save_merged`: the base model with the adapter(s) merged in, written from the live sharded model as
`peft_model.merge_and_unload().save_pretrained(...)` writes it, without unsharding the model anywhere.

Every rank plans from metadata alone (`shardsave.merged.planning`: the same collectors and key plan as
`save_pretrained`, `plan.merge_steps`' steps, the Hugging Face key list and file split from a meta-device skeleton), and
all agree on it through the handshake every call runs (`shardsave.ranks.handshake`). Only the LoRA factors (and
token deltas) are gathered and broadcast; each rank merges the runs of the base weights it holds, on their device,
into fresh buffers (the live model is never modified). Where every rank sees the folder the writer staged, each
writes its merged runs into the files at their offsets (`shardsave.merged.parallel`); otherwise the runs stream to
the writer one tensor at a time, which writes each safetensors file in order (`shardsave.merged.exchange`). The
writer publishes the folder atomically. A DoRA tensor whose runs cut its rows (ZeRO-3, FSDP1 flat ranges) travels
unmerged and is merged whole on the writer: its weight norm needs whole rows, and that keeps it bit-equal to PEFT's.

The merge device is the CPU (`MERGE_DEVICE`), on every backend: the factors arrive on the host, and a base run
held on a GPU is copied to the host (it is written from there anyway) and merged there. So the files are bit-equal
to PEFT's `merge_and_unload()` of the same weights on the CPU (and to `python -m shardsave.merge`), whatever the
backend, the sharding, offload or GPU model; PEFT's merge on a GPU differs from that in the last bits (bf16 / fp16
factors are multiplied in their own type there, in float32 on the CPU, and cuBLAS kernels vary with the GPU and
the shapes), so no GPU merge could promise one answer. Tensors the adapter does not change are never computed on.

Parallel writes are used only on filesystems known to keep several writers' ranges of one file
(`shardsave.storage.filesystems`; FUSE, NFS and unknown types stream unless `parallel_write=True`), and proven: once
every rank has written and fsynced, each reads its own ranges back and compares their checksums with what it
wrote (the writer also each file's header and size); the writer publishes only when every rank's match.

Every step at which one rank may fail alone (planning, the factor gather and its buffers, a merge, a write, the
read-back) is agreed through the store before the next collective: every rank raises that rank's error (a
`RemoteError` naming it on the others) within the timeout, instead of the others waiting in a collective.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from shardsave.log import logger
from shardsave.merged.exchange import MERGE_DEVICE, Exchange, MergedRuns, full_factors, merge_on, stream
from shardsave.merged.parallel import decide_parallel, stage_files, write_in_place
from shardsave.merged.planning import MergedPlan, plan_merged, write_order
from shardsave.ranks.handshake import start
from shardsave.ranks.identity import Ranks, resolve_timeout
from shardsave.ranks.rendezvous import Rendezvous
from shardsave.storage.local import check_path_argument

__all__ = ["save_merged", "MERGE_DEVICE", "merge_on", "decide_parallel"]


def save_merged(
    model,
    save_directory,
    *,
    selected_adapters: Sequence[str] | None = None,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    dtype: torch.dtype | None = None,
    is_main_process: bool | None = None,
    timeout: float | None = None,
    parallel_write: bool | None = None,
) -> None:
    """Write the base model with the adapter(s) merged in, as `merge_and_unload().save_pretrained(save_directory,
    max_shard_size=...)` would, from any rank layout `save_pretrained` supports. Call it on every rank.

    `selected_adapters` are merged in that order (default: the active adapter). `dtype` casts the merged
    floating-point tensors (default: each keeps its training dtype). The live model is not modified, and no
    rank holds more than its own shard plus one tensor: each merges the runs it holds, on the CPU (bit-equal to
    PEFT's merge on the CPU, on every backend). With `parallel_write=None`, where every rank sees the save's folder
    on a filesystem known to keep several writers' ranges of one file (local disks, tmpfs, Lustre, GPFS, ...; not
    FUSE, NFS or unknown types: `shardsave.storage.filesystems`), each rank writes its merged runs straight into the
    files at offsets known from their headers, in parallel, and reads them back before the writer publishes; otherwise
    the runs stream to the writer one tensor at a time. `True` writes in parallel on any shared filesystem (still
    read back), `False` always streams. Published atomically; raises on every rank if any rank failed.
    """
    if not safe_serialization:
        raise ValueError("save_merged writes safetensors only (what transformers 5 writes); leave safe_serialization.")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}.")
    if parallel_write not in (None, True, False):
        raise ValueError(f"parallel_write must be None, True or False, got {parallel_write!r}.")
    started = time.perf_counter()
    ranks = Ranks.current()
    rdv = Rendezvous(ranks, op="save_merged", timeout=resolve_timeout(timeout))
    path = check_path_argument(save_directory)
    selected = None if selected_adapters is None else list(selected_adapters)

    def prepare(is_main: bool) -> MergedPlan:
        return plan_merged(model, ranks, selected, dtype, max_shard_size, path, is_main)

    merged, writer = start(rdv, prepare, is_main_process)
    if writer < 0:
        return
    destination = merged.destination
    tensors = full_factors(merged, writer, rdv)
    runs = MergedRuns(merged, tensors, ranks.rank, ranks.world_size)
    order = write_order(merged)
    sharded = merged.collector.backend != "local" and ranks.distributed
    exchange = Exchange(runs, writer, rdv, sharded)
    if sharded and parallel_write is not False:
        staged = stage_files(rdv, merged, writer, destination, parallel_write)
        if staged is not None:
            write_in_place(rdv, merged, runs, order, writer, destination, staged, exchange)
            if ranks.rank == writer:
                logger.info("saved the merged model (%d tensors, %d files, written by %d ranks and read back) to %s "
                            "in %.2f s", len(order), len(merged.files), ranks.world_size, destination,
                            time.perf_counter() - started, extra={"writer": True})  # fmt: skip
            return
    stream(rdv, merged, runs, order, writer, destination, exchange)
    if ranks.rank == writer:
        logger.info("saved the merged model (%d tensors, %d files) to %s in %.2f s", len(order), len(merged.files),
                    destination, time.perf_counter() - started, extra={"writer": True})  # fmt: skip
