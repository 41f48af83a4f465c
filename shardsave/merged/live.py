"""`save_merged`: the base model with the adapter(s) merged in, written from the live sharded model as
`peft_model.merge_and_unload().save_pretrained(...)` writes it, without unsharding the model anywhere.

Every rank plans from metadata alone (the same collectors and key plan as `save_pretrained`, `merge_math`'s
steps, the Hugging Face key list and file split from a meta-device skeleton). Only the LoRA factors (and token
deltas) are gathered and broadcast; each rank merges the runs of the base weights it holds, on their device,
into fresh buffers (the live model is never modified). Where every rank sees the folder the writer staged, each
writes its merged runs into the files at their offsets; otherwise the runs stream to the writer one tensor at a
time, which writes each safetensors file in order. The writer publishes the folder atomically. A DoRA tensor whose
runs cut its rows (ZeRO-3, FSDP1 flat ranges) travels unmerged and is merged whole on the writer: its weight
norm needs whole rows, and that keeps it bit-equal to PEFT's.

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

import copy
import hashlib
import json
import math
import os
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from shardsave.compat import hf_saved_keys
from shardsave.log import logger
from shardsave.merged.offline import split_files, write_model_files
from shardsave.plan.keys import plan_choices
from shardsave.plan.merge_steps import PEFT_PREFIX, MergeRefused, Step, plan_merge
from shardsave.plan.ranges import Slice
from shardsave.plan.skeleton import meta_model
from shardsave.plan.structure import Layout, build_layout, find_peft_model, peel
from shardsave.ranks.collect import Collector, TensorInfo, collector_for, describe_stage, staged_collector
from shardsave.ranks.collect.sharded import ShardedCollector, Transfer, comm_device
from shardsave.ranks.rendezvous import Ranks, Rendezvous, SaveError, raise_on_failure, resolve_timeout, status_of
from shardsave.ranks.replicas import ALL_RANKS, fingerprints, held_prints
from shardsave.save.gathered import agree_start, run_gather
from shardsave.storage.filesystems import filesystem_type, parallel_safe
from shardsave.storage.local import check_destination, check_path_argument, discard, publish, stage_directory
from shardsave.storage.streaming import TensorSpec, file_layout, file_order, write_streaming
from shardsave.tensors.merge_math import merge_tensor

__all__ = ["save_merged", "MERGE_DEVICE", "merge_on", "decide_parallel"]

#: Where `save_merged` merges, on every backend (see the module docstring for why).
MERGE_DEVICE = torch.device("cpu")

_RUN_MARKER = ".shardsave-merged-run"  # in the staged folder while the ranks write into it
_READ_CHUNK = 1 << 22  # bytes read back at a time
_WRAPPERS = ("base_layer", "original_module", "token_adapter")  # PEFT's modules around a base module


@dataclass(slots=True)
class _Merged:
    """What every rank knows before anything moves: the files, each tensor's live source and steps."""

    collector: Collector
    specs: dict[str, TensorSpec]  # saved key -> shape and output dtype, in save order
    sources: dict[str, str]  # saved key -> live state-dict name holding the (base or copied) values
    steps: dict[str, list[Step]]
    factors: dict[tuple[str, str], str]  # (adapter, saved adapter key) -> live name, for every factor a step uses
    files: dict[str, list[str]]  # file name -> its keys, in huggingface_hub's split
    index: dict | None  # model.safetensors.index.json, when sharded
    config: object
    generation: object | None
    architecture: str  # the merged model's class, as save_pretrained records it
    args: dict
    whole_on_writer: set[str] = field(default_factory=set)  # DoRA tensors whose runs cut rows: merged by the writer
    decided: dict | None = None  # the writer's, shared in the agreement
    replicas: dict[str, str] = field(default_factory=dict)  # fingerprints of the copies this rank holds, compared

    def view(self) -> dict:
        """This rank's runs of every tensor it will write or read, for layouts whose groups the ranks cannot derive
        alone (each rank holds every module, but only it knows its group): put together as for `save_pretrained`
        (`shardsave.plan.stages`). A pipeline stage never gets here: its keys are refused while planning."""
        names = list(dict.fromkeys([*self.sources.values(), *self.factors.values()]))
        return {"tensors": describe_stage(self.collector, names), "entries": {}}

    def restage(self, union: dict, writer: int, ranks: Ranks) -> None:
        self.collector = staged_collector(self.collector, union, ranks)
        self.whole_on_writer = _split_rows(self)


def _merged_name(live: str) -> str:
    """The base model's key for a live state-dict name: PEFT's prefix and wrapper modules removed."""
    parts = live.removeprefix(PEFT_PREFIX).split(".")
    return ".".join(p for p in parts if p not in _WRAPPERS)


def _adapter_state(layout: Layout) -> list[str]:
    """Prefixes of every adapter tensor (LoRA factors, copies, token deltas) of every adapter: not base weights."""
    prefixes = []
    for t in layout.tuners:
        members = set(t.members) | set(t.keyed)
        prefixes += [f"{t.path}.{m}" if t.path else m for m in members]
    return prefixes


def _live_config(config) -> dict:
    """The adapter's config for merging into the live base. A PiSSA / CorDA / OLoRA adapter is merged as it is:
    the live base is the residual base it was initialised against (offline, the saved base is not)."""
    data = config.to_dict()
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "corda", "olora")):
        data["init_lora_weights"] = True
    return data


def _skeleton(hf_model):
    """The base model class on the meta device: its saved keys (tied copies left out, transformers' key conversion
    reverted) and parameter count, as `save_pretrained` of the merged model gives them."""
    skeleton = meta_model(copy.deepcopy(hf_model.config), type(hf_model))
    conversions = getattr(hf_model, "_weight_conversions", None)
    if conversions is not None:
        skeleton._weight_conversions = conversions
    return skeleton, hf_saved_keys(skeleton)


def _plan(model, ranks: Ranks, selected: list[str] | None, dtype, max_shard_size, path: str, is_main: bool) -> _Merged:
    peft_model = find_peft_model(model)
    names = list(peft_model.peft_config) if selected is None else list(selected)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown or not names:
        raise ValueError(f"selected_adapters: {unknown or names} not among the model's adapters "
                         f"{list(peft_model.peft_config)}.")  # fmt: skip
    if selected is None and len(names) > 1:
        names = [peft_model.active_adapter] if isinstance(peft_model.active_adapter, str) else names
    root = peel(model)
    collector = collector_for(root, ranks)
    infos = collector.infos()
    layout = build_layout(peft_model)
    choices = plan_choices(layout, peft_model, list(infos), names, False)
    entries = {n: choices[n][False].entries for n in names}
    try:
        steps = plan_merge([(n, _live_config(peft_model.peft_config[n]), list(entries[n])) for n in names])
    except MergeRefused as exc:
        raise ValueError(f"shardsave.save_merged: {exc}") from None
    hf_model = peft_model.get_base_model()
    skeleton, saved = _skeleton(hf_model)
    adapter_state = _adapter_state(layout)
    live: dict[str, str] = {}
    for name in infos:
        if any(name == p or name.startswith(p + ".") for p in adapter_state):
            continue
        live.setdefault(_merged_name(name), name)
    tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    for key in steps:
        if key in tied:
            raise ValueError(
                f"shardsave.save_merged: the adapter changes {key}, which the base model ties to {tied[key]}; PEFT's "
                f"merge would untie them. Untie the embeddings (tie_word_embeddings=False) before training."
            )
        if key not in saved:
            raise ValueError(
                f"shardsave.save_merged: the adapter changes {key}, which the base model does not have (lora_bias on "
                f"a layer without a bias?); PEFT cannot merge it either."
            )
    sources, plan, factors = {}, {}, {}
    for key in saved:
        key_steps = list(steps.get(key, []))
        if key_steps and key_steps[0].kind == "replace":  # modules_to_save: the live copy is the value
            step = key_steps.pop(0)
            sources[key] = entries[step.adapter][step.tensors["value"]]
        elif key in live:
            sources[key] = live[key]
        else:
            raise ValueError(
                f"shardsave.save_merged: {type(hf_model).__name__}.save_pretrained writes {key}, which this rank's "
                f"model does not hold under that name: a pipeline stage holding only its own layers (save_merged does "
                f"not put stages together yet), or a model whose save_pretrained converts its weights. Save the "
                f"adapter with shardsave.save_pretrained, then merge it offline: python -m shardsave.merge ADAPTER "
                f"--into BASE -o OUT."
            )
        for step in key_steps:
            for adapter_key in step.tensors.values():
                factors[step.adapter, adapter_key] = entries[step.adapter][adapter_key]
        plan[key] = key_steps
    specs = {}
    for key in saved:
        info = infos[sources[key]]
        out = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        specs[key] = TensorSpec(tuple(info.shape), out)
    files, index = split_files(specs, max_shard_size, skeleton.num_parameters())
    generation = hf_model.generation_config if hf_model.can_generate() else None
    layout_digest = [[k, sources[k], [[st.adapter, st.kind, dict(st.tensors)] for st in plan[k]],
                      [[p.rank, p.start, p.stop] for p in collector.slices(collector.primary(sources[k])) or ()]]
                     for k in saved]  # fmt: skip
    args = {
        "save_directory": path,
        "selected_adapters": names,
        "dtype": str(dtype),
        "max_shard_size": str(max_shard_size),
        "plan": hashlib.sha256(json.dumps(layout_digest).encode()).hexdigest()[:16],
    }
    merged = _Merged(collector, specs, sources, plan, factors, files, index, hf_model.config, generation,
                     type(hf_model).__name__, args)  # fmt: skip
    merged.whole_on_writer = _split_rows(merged)
    if ranks.distributed:
        merged.replicas = _copies(collector, [*sources.values(), *factors.values()], ranks)
    if is_main:
        merged.decided = {"destination": str(check_destination(path))}
    return merged


def _copies(collector: Collector, names: list[str], ranks: Ranks) -> dict[str, dict[str, str]]:
    """Fingerprints of what several ranks hold copies of and the merge reads from one of them: replicated runs of
    sharded tensors (HSDP, ZeRO-3 groups), and trainable tensors held whole on every rank (LoRA factors and
    `modules_to_save` copies under DDP or ZeRO-3 persistence, parameters FSDP left unsharded), which a parallel
    write takes from different ranks. Rank 0 refuses copies that drifted apart (`save._agree_on_replicas`), as
    `save_pretrained` and `save_shards` do. Frozen base weights held whole are left out: nothing trains them.
    By replica group, as `replicas.held_prints` gives them; tensors held whole form the group of every rank
    (`replicas.ALL_RANKS`)."""
    prints = held_prints(collector, names, ranks.rank)
    infos = collector.infos()
    whole = {}
    for name in dict.fromkeys(collector.primary(n) for n in names):
        if collector.slices(name) is None and infos[name].requires_grad:
            whole[f"{name}@0"] = collector.whole(name).detach()
    if whole:
        prints = {**prints, ALL_RANKS: {**prints.get(ALL_RANKS, {}), **fingerprints(whole)}}
    return prints


def _split_rows(merged: _Merged) -> set[str]:
    """The DoRA tensors some run of which cuts rows (not FSDP2's Shard(0), not held whole): merged by the writer."""
    out = set()
    for key, steps in merged.steps.items():
        slices = merged.collector.slices(merged.collector.primary(merged.sources[key]))
        if slices is None or not any(step.dora for step in steps):
            continue
        shape = merged.specs[key].shape
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        if any(s.start % cols or s.stop % cols for s in slices):
            out.add(key)
    return out


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


class _MergedRuns(ShardedCollector):
    """The merged values of the saved tensors, as runs held where the base runs are: `local` merges this rank's
    run of a base tensor into a fresh buffer (never the live one), on `MERGE_DEVICE`. A merge that fails records
    its error (`error`) and gives zeros from then on, so that this rank still takes its part in every collective;
    the error is agreed after them (nothing is published)."""

    backend = "merged"

    def __init__(self, merged: _Merged, tensors: dict[tuple[str, str], torch.Tensor], rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.merged = merged
        self.inner = merged.collector
        self.tensors = tensors
        self.device = MERGE_DEVICE
        self.error: SaveError | None = None
        self._last: tuple[str, int, torch.Tensor] | None = None
        for key, spec in merged.specs.items():
            dtype = self.inner.infos()[merged.sources[key]].dtype if key in merged.whole_on_writer else spec.dtype
            self._infos[key] = TensorInfo(spec.shape, dtype, False)

    def _source(self, key: str) -> str:
        return self.inner.primary(self.merged.sources[key])

    def _slices(self, key: str) -> list[Slice] | None:
        return self.inner.slices(self._source(key))

    def replicated(self, key: str) -> bool:
        return self.inner.replicated(self._source(key))

    def held_by(self, key: str, rank: int) -> list[tuple[int, int]]:
        return self.inner.held_by(self._source(key), rank)

    def own(self, key: str) -> list[Slice]:
        return self.inner.own(self._source(key))

    def local(self, key: str, piece: Slice) -> torch.Tensor:
        if self._last is not None and self._last[:2] == (key, piece.start):
            return self._last[2]  # a run split over rounds: merged once
        run = self.inner.local(self._source(key), piece).detach()
        merged = self._merge(key, run, piece.start)
        self._last = (key, piece.start, merged)
        return merged

    def whole(self, key: str) -> torch.Tensor:
        live = self.inner.whole(self._source(key)).detach().reshape(-1)
        out = self._merge(key, live, 0)
        # a copy: the writer hands it to numpy, which would pin the live storage (FSDP frees it by resizing)
        return out.clone() if out.untyped_storage().data_ptr() == live.untyped_storage().data_ptr() else out

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


def _factors(merged: _Merged, writer: int, rdv: Rendezvous) -> dict[tuple[str, str], torch.Tensor]:
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


def _order(merged: _Merged) -> list[tuple[str, str]]:
    """(file, key) in the order the writer writes them: every rank takes part in each tensor's gather in it."""
    return [(f, k) for f, keys in merged.files.items() for k in file_order({k: merged.specs[k] for k in keys})]


def _model_files(tmp: Path, merged: _Merged) -> None:
    first = next((s.dtype for s in merged.specs.values() if s.dtype.is_floating_point), torch.float32)
    write_model_files(tmp, merged.config, dtype=first, architecture=merged.architecture,
                      generation=merged.generation, index=merged.index)  # fmt: skip


def _write_error(exc: Exception, rank: int, where: Path) -> Exception:
    """An OS error while writing, as the `SaveError` every rank reports; anything else as it is."""
    if not isinstance(exc, OSError):
        return exc
    error = SaveError(f"shardsave.save_merged: rank {rank} writing into {where} failed: {type(exc).__name__}: "
                      f"{exc}. Nothing was published; choose a writable save_directory with free space.")  # fmt: skip
    error.__cause__ = exc
    return error


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

    def prepare(is_main: bool) -> _Merged:
        return _plan(model, ranks, selected, dtype, max_shard_size, path, is_main)

    merged, writer, decided = agree_start(rdv, ranks, prepare, is_main_process)
    if writer < 0:
        return
    destination = Path(decided["destination"])
    tensors = _factors(merged, writer, rdv)
    runs = _MergedRuns(merged, tensors, ranks.rank, ranks.world_size)
    order = _order(merged)
    sharded = merged.collector.backend != "local" and ranks.distributed
    exchange = _Exchange(runs, writer, rdv, sharded)
    if sharded and parallel_write is not False:
        staged = _stage_files(rdv, merged, writer, destination, parallel_write)
        if staged is not None:
            _write_in_place(rdv, merged, runs, order, writer, destination, staged, exchange)
            if ranks.rank == writer:
                logger.info("saved the merged model (%d tensors, %d files, written by %d ranks and read back) to %s "
                            "in %.2f s", len(order), len(merged.files), ranks.world_size, destination,
                            time.perf_counter() - started, extra={"writer": True})  # fmt: skip
            return
    _stream(rdv, merged, runs, order, writer, destination, exchange)
    if ranks.rank == writer:
        logger.info("saved the merged model (%d tensors, %d files) to %s in %.2f s", len(order), len(merged.files),
                    destination, time.perf_counter() - started, extra={"writer": True})  # fmt: skip


class _Exchange:
    """One saved tensor, whole, to the writer (its merged runs gathered, or its whole copy read there). Once an
    exchange failed (a peer died or hangs), `broken` says so and no further one is tried: each would wait the
    timeout again."""

    def __init__(self, runs: _MergedRuns, writer: int, rdv: Rendezvous, sharded: bool):
        self.runs, self.writer, self.rdv, self.sharded = runs, writer, rdv, sharded
        self.broken = False

    def __call__(self, key: str) -> torch.Tensor | None:
        runs, on_writer = self.runs, self.rdv.ranks.rank == self.writer
        if self.broken:
            raise SaveError(f"shardsave.save_merged: rank {self.rdv.ranks.rank}: an earlier exchange failed.")
        if not self.sharded or runs.slices(key) is None:
            return runs.finish(key, runs.whole(key).view(runs.merged.specs[key].shape)) if on_writer else None
        try:
            transfer = Transfer(runs, [key], runs.plan([key], self.writer))
        except Exception:
            self.broken = True
            raise
        out, error = run_gather(transfer, self.writer, self.rdv)
        if error is not None:
            self.broken = True
            raise error
        return runs.finish(key, out[key]) if on_writer else None


def _stream(rdv: Rendezvous, merged: _Merged, runs: _MergedRuns, order, writer: int, destination: Path,
            exchange: _Exchange) -> None:  # fmt: skip
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
        outcome = rdv.wait_for("done", writer, heartbeat=True)
        raise_on_failure({writer: outcome}, own=None, ranks=ranks, op="save_merged")
        return
    done, agreed = 0, False

    def produce(key: str) -> torch.Tensor:
        nonlocal done
        tensor = exchange(key)
        done += 1
        return tensor

    def fill(tmp: Path) -> None:
        nonlocal agreed
        _model_files(tmp, merged)
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
            error = _write_error(exc, ranks.rank, destination)
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
    if ranks.distributed:
        rdv.post("done", status_of(error))
    if error is not None:
        raise error


def decide_parallel(statuses: Mapping[int, Mapping], required: bool | None) -> dict:
    """Rank 0's verdict on a parallel write from every rank's `{"sees": bool, "fs": type}` of the staged folder:
    when every rank sees it, on a filesystem that keeps several writers' ranges of one file
    (`shardsave.storage.filesystems.PARALLEL_SAFE`), or any filesystem if `required`.
    `{"parallel": bool, "why": str}`."""
    blind = sorted(rank for rank, status in statuses.items() if not status["sees"])
    if blind:
        return {"parallel": False, "why": f"rank(s) {blind} do not see the folder the writer staged"}
    unsafe = {rank: status["fs"] for rank, status in sorted(statuses.items()) if not parallel_safe(status["fs"])}
    if unsafe and not required:
        types = sorted(set(map(str, unsafe.values())))
        why = f"rank(s) {sorted(unsafe)} see it on {types}, a filesystem that may keep only the last writer's bytes"
        return {"parallel": False, "why": why}
    return {"parallel": True, "why": "every rank sees the staged folder" + (" (parallel_write=True)" if unsafe else "")}


def _stage_files(
    rdv: Rendezvous, merged: _Merged, writer: int, destination: Path, required: bool | None
) -> Path | None:
    """The writer stages the folder: texts, and each safetensors file as its header and its full (sparse) size;
    every rank then checks that it sees it, and on which filesystem. Returns the staged folder when a parallel
    write is agreed (each rank writes its runs there), None when not (the runs stream to the writer instead;
    `required` and a rank that does not see it: an error). On a filesystem not known to keep concurrent writes
    the writer stages nothing, unless `required`."""
    ranks = rdv.ranks
    if ranks.rank == writer:
        fstype = filesystem_type(destination.parent)
        if required is None and not parallel_safe(fstype):
            logger.info("save_merged: %s is on a %s filesystem, which may keep only the last writer's bytes of a "
                        "file: the merged runs stream to the writer (parallel_write=True writes in parallel and "
                        "checks the result)", destination, fstype, extra={"writer": True})  # fmt: skip
            rdv.post("staged", status_of(None, tmp=None))
            return None
        tmp, run, error = None, uuid.uuid4().hex, None
        try:
            tmp = stage_directory(destination)
            _model_files(tmp, merged)
            for filename, keys in merged.files.items():
                specs = {k: merged.specs[k] for k in keys}
                head, _ = file_layout(specs, metadata={"format": "pt"})
                with open(tmp / filename, "wb") as f:
                    f.write(head)
                    f.truncate(len(head) + sum(spec.nbytes for spec in specs.values()))
            (tmp / _RUN_MARKER).write_text(run)
        except Exception as exc:
            error = exc
        rdv.post("staged", status_of(error, tmp=str(tmp), run=run))
        if error is not None:
            if tmp is not None:
                discard(tmp)
            raise error
    else:
        staged = rdv.wait_for("staged", writer)
        raise_on_failure({writer: staged}, own=None, ranks=ranks, op="save_merged")
        if staged["tmp"] is None:
            return None
        tmp, run = Path(staged["tmp"]), staged["run"]
    try:
        sees = (tmp / _RUN_MARKER).read_text() == run
    except OSError:
        sees = False
    error = None
    if required and not sees:
        error = SaveError(
            f"shardsave.save_merged(parallel_write=True): rank {ranks.rank} cannot see {tmp}, which the writer "
            f"(rank {writer}) staged; every rank must see one filesystem. Pass parallel_write=None to fall back."
        )
    status = {"sees": sees, "fs": filesystem_type(tmp) if sees else None}
    try:
        verdict = rdv.agree("visible", status, own=error, decide=lambda statuses: decide_parallel(statuses, required))
    except BaseException:
        if ranks.rank == writer:
            discard(tmp)
        raise
    if not verdict["parallel"]:
        if ranks.rank == writer:
            logger.info("save_merged: the merged runs stream to the writer: %s", verdict["why"], extra={"writer": True})
            discard(tmp)
        return None
    return tmp


def _mine(runs: _MergedRuns, key: str, world_size: int) -> list[Slice]:
    """The runs of `key` this rank writes: the runs it sends; a tensor every rank holds whole, by one rank picked
    from its name (the work spread over the ranks)."""
    slices = runs.slices(key)
    if slices is None:
        owner = zlib.crc32(key.encode()) % world_size
        return [Slice(owner, 0, math.prod(runs.merged.specs[key].shape))] if owner == runs.rank else []
    return [s for s in slices if s.rank == runs.rank and s.stop > s.start]


@dataclass(frozen=True, slots=True)
class _Written:
    """A byte range this rank wrote into a staged file, and the checksum of what it meant to write there."""

    filename: str
    offset: int
    nbytes: int
    crc: int


def _pwrite(fd: int, data: memoryview, at: int) -> None:
    while data.nbytes:
        written = os.pwrite(fd, data, at)
        data, at = data[written:], at + written


def _read_back(tmp: Path, ranges: list[_Written], sizes: Mapping[str, int], rank: int) -> None:
    """Read every range back from the files (opened anew, after every rank closed them) and compare checksums;
    `sizes` (the writer's): each file's full size. Raises `SaveError` naming the first range that differs."""
    by_file: dict[str, list[_Written]] = {}
    for r in ranges:
        by_file.setdefault(r.filename, []).append(r)
    buffer = memoryview(bytearray(_READ_CHUNK))
    for filename in dict.fromkeys([*sizes, *by_file]):
        fd = os.open(tmp / filename, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if filename in sizes and size != sizes[filename]:
                raise _lost(rank, tmp / filename, f"it is {size} bytes long, not {sizes[filename]}")
            for r in by_file.get(filename, ()):
                crc, at, left = 0, r.offset, r.nbytes
                while left:
                    got = os.preadv(fd, [buffer[: min(left, _READ_CHUNK)]], at)
                    if not got:
                        break
                    crc, at, left = zlib.crc32(buffer[:got], crc), at + got, left - got
                if left or crc != r.crc:
                    raise _lost(rank, tmp / filename, f"bytes [{r.offset}, {r.offset + r.nbytes}) this rank wrote "
                                f"read back different")  # fmt: skip
        finally:
            os.close(fd)


def _lost(rank: int, path: Path, what: str) -> SaveError:
    return SaveError(
        f"shardsave.save_merged: the parallel write did not hold on {path} (rank {rank}, filesystem "
        f"{filesystem_type(path)}): {what}, after every rank had written and fsynced it. This filesystem does not "
        f"keep several ranks' writes to one file (an object-store mount keeps the last writer's copy). Nothing was "
        f"published; pass parallel_write=False to stream the tensors to the writer."
    )


def _write_in_place(rdv, merged: _Merged, runs: _MergedRuns, order, writer: int, destination: Path, tmp: Path,
                    exchange: _Exchange) -> None:  # fmt: skip
    """Every rank writes its merged runs into the staged files (pwrite at their offsets) and fsyncs them; DoRA
    tensors whose runs cut rows are gathered and written by the writer. Once every rank has, each reads its
    ranges back; the writer publishes only if every rank's match."""
    ranks = rdv.ranks
    layouts = {f: file_layout({k: merged.specs[k] for k in keys}, metadata={"format": "pt"})
               for f, keys in merged.files.items()}  # fmt: skip
    fds: dict[str, int] = {}
    written: list[_Written] = []
    error = None
    try:
        for filename, key in order:
            if key in merged.whole_on_writer:  # a collective: taken part in even after a failure here
                try:
                    tensor = exchange(key)
                except Exception as exc:
                    error = error or exc
                    break
                pieces = [] if tensor is None else [(0, tensor.reshape(-1))]
            elif error is None:
                pieces = []
                for piece in _mine(runs, key, ranks.world_size):
                    if runs.slices(key) is None:
                        pieces.append((0, runs.whole(key)))
                    else:
                        pieces.append((piece.start, runs.local(key, piece)))
            else:
                continue
            error = error or runs.error
            if error is not None:
                continue
            itemsize = merged.specs[key].dtype.itemsize
            try:
                for start, data in pieces:
                    if filename not in fds:
                        fds[filename] = os.open(tmp / filename, os.O_WRONLY)
                    raw = memoryview(data.detach().to("cpu").contiguous().view(torch.uint8).numpy())
                    at = layouts[filename][1][key] + start * itemsize
                    _pwrite(fds[filename], raw, at)
                    written.append(_Written(filename, at, raw.nbytes, zlib.crc32(raw)))
            except OSError as exc:
                error = _write_error(exc, ranks.rank, tmp)
        if error is None:
            for fd in fds.values():
                os.fsync(fd)
    except OSError as exc:
        error = _write_error(exc, ranks.rank, tmp)
    finally:
        for fd in fds.values():
            os.close(fd)
    sizes = {}
    if ranks.rank == writer:  # the headers it staged, and each file's size
        for filename, (head, _) in layouts.items():
            written.append(_Written(filename, 0, len(head), zlib.crc32(head)))
            sizes[filename] = len(head) + sum(merged.specs[k].nbytes for k in merged.files[filename])
    try:
        rdv.agree("written", {}, own=error)
        error = None
        try:
            _read_back(tmp, written, sizes, ranks.rank)
        except Exception as exc:
            error = _write_error(exc, ranks.rank, tmp)
        rdv.agree("read-back", {}, own=error)
    except BaseException:
        if ranks.rank == writer:
            discard(tmp)
        raise
    if ranks.rank != writer:
        outcome = rdv.wait_for("done", writer, heartbeat=True)
        raise_on_failure({writer: outcome}, own=None, ranks=ranks, op="save_merged")
        return
    error = None
    with rdv.heartbeat():
        try:
            (tmp / _RUN_MARKER).unlink()
            publish(destination, lambda _: None, staged=tmp)
        except Exception as exc:
            error = exc
    rdv.post("done", status_of(error))
    if error is not None:
        raise error
