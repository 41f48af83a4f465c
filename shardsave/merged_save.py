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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .collect import Collector, TensorInfo, collector_for, describe_stage, staged_collector
from .collect.sharded import ShardedCollector, Transfer, comm_device
from .compat import hf_saved_keys
from .layout import Layout, build_layout, find_peft_model, peel
from .log import logger
from .merge_math import PEFT_PREFIX, MergeRefused, Step, merge_tensor, plan_merge
from .merged import split_files, write_model_files
from .plan import Slice
from .ranks import Ranks, Rendezvous, SaveError, raise_on_failure, resolve_timeout, status_of
from .save import agree_start, run_gather
from .select import plan_choices
from .stream import TensorSpec, file_layout, file_order, write_streaming
from .writer import check_destination, check_path_argument, discard, publish, stage_directory

__all__ = ["save_merged"]

_RUN_MARKER = ".shardsave-merged-run"  # in the staged folder while the ranks write into it
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

    def view(self) -> dict:
        """This rank's runs of every tensor it will write or read, for layouts whose groups the ranks cannot derive
        alone (each rank holds every module, but only it knows its group): put together as for `save_pretrained`
        (`shardsave.stages`). A pipeline stage never gets here: its keys are refused while planning."""
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
    config = copy.deepcopy(hf_model.config)
    with torch.device("meta"):
        skeleton = type(hf_model)._from_config(config)
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
    if is_main:
        merged.decided = {"destination": str(check_destination(path))}
    return merged


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


class _MergedRuns(ShardedCollector):
    """The merged values of the saved tensors, as runs held where the base runs are: `local` merges this rank's
    run of a base tensor into a fresh buffer (never the live one). Tensors in `raw` travel as they are."""

    backend = "merged"

    def __init__(self, merged: _Merged, tensors: dict[tuple[str, str], torch.Tensor], rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.merged = merged
        self.inner = merged.collector
        self.tensors = tensors
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
        out = run.to(spec.dtype, copy=True)
        return merge_tensor(out, spec.shape, self.merged.steps[key], self.tensors, start=start).reshape(-1)

    def finish(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The writer's last step on a gathered tensor: a DoRA tensor that travelled unmerged is merged whole."""
        spec = self.merged.specs[key]
        if key not in self.merged.whole_on_writer:
            return tensor
        out = tensor.reshape(spec.shape).to(spec.dtype, copy=True)
        return merge_tensor(out, spec.shape, self.merged.steps[key], self.tensors)


def _factors(merged: _Merged, writer: int, rdv: Rendezvous) -> dict[tuple[str, str], torch.Tensor]:
    """Every LoRA factor / delta a step uses, full, on every rank: gathered to the writer, then broadcast."""
    collector = merged.collector
    names = list(dict.fromkeys(merged.factors.values()))
    if not names:
        return {}
    if collector.backend == "local" or not rdv.ranks.distributed:
        full = {n: collector.whole(n).detach() for n in names}
    else:
        plan = collector.plan(names, writer)
        transfer = collector.prepare_gather(names, writer) if rdv.ranks.rank == writer else None
        if transfer is None:
            error = run_gather(collector.prepare_gather(names, writer), writer, rdv)[1]
            packed = torch.empty(max(plan.total, 1), dtype=torch.uint8)
        else:
            error = run_gather(transfer, writer, rdv)[1]
            packed = transfer.output
        if error is not None:
            raise error
        device = comm_device(torch.device("cpu"))
        buffer = packed.to(device)
        dist.broadcast(buffer, src=writer)
        packed = buffer.cpu()
        full = {}
        for name in names:
            info = collector.infos()[collector.primary(name)]
            offset = plan.offsets[collector.primary(name)]
            nbytes = math.prod(info.shape) * info.dtype.itemsize
            full[name] = packed[offset : offset + nbytes].view(info.dtype).view(info.shape)
    return {pair: full[name] for pair, name in merged.factors.items()}


def _order(merged: _Merged) -> list[tuple[str, str]]:
    """(file, key) in the order the writer writes them: every rank takes part in each tensor's gather in it."""
    return [(f, k) for f, keys in merged.files.items() for k in file_order({k: merged.specs[k] for k in keys})]


def _model_files(tmp: Path, merged: _Merged) -> None:
    first = next((s.dtype for s in merged.specs.values() if s.dtype.is_floating_point), torch.float32)
    write_model_files(tmp, merged.config, dtype=first, architecture=merged.architecture,
                      generation=merged.generation, index=merged.index)  # fmt: skip


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
    rank holds more than its own shard plus one tensor: each merges the runs it holds. Where every rank sees
    the save's folder (a shared filesystem; `parallel_write=None` checks, True requires it, False never), each
    rank writes its merged runs straight into the files at offsets known from their headers, in parallel;
    otherwise the runs stream to the writer one tensor at a time. Published atomically; raises on every rank
    if any rank failed.
    """
    if not safe_serialization:
        raise ValueError("save_merged writes safetensors only (what transformers 5 writes); leave safe_serialization.")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}.")
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

    def gather(key: str) -> torch.Tensor | None:
        if not sharded or runs.slices(key) is None:
            return runs.finish(key, runs.whole(key).view(merged.specs[key].shape)) if ranks.rank == writer else None
        transfer = Transfer(runs, [key], runs.plan([key], writer))
        out, error = run_gather(transfer, writer, rdv)
        if error is not None:
            raise error
        return runs.finish(key, out[key]) if ranks.rank == writer else None

    if sharded and parallel_write is not False:
        staged = _stage_files(rdv, merged, writer, destination, parallel_write)
        if staged is not None:
            _write_in_place(rdv, merged, runs, order, writer, destination, staged, gather)
            logger.info("saved the merged model (%d tensors, %d files, written by %d ranks) to %s in %.2f s",
                        len(order), len(merged.files), ranks.world_size, destination, time.perf_counter() - started,
                        extra={"writer": True})  # fmt: skip
            return
    if ranks.rank != writer:
        for _, key in order:
            gather(key)
        outcome = rdv.wait_for("done", writer, heartbeat=True)
        raise_on_failure({writer: outcome}, own=None, ranks=ranks, op="save_merged")
        return
    done = 0
    error = None

    def produce(key: str) -> torch.Tensor:
        nonlocal done
        tensor = gather(key)
        done += 1
        return tensor

    def fill(tmp: Path) -> None:
        _model_files(tmp, merged)
        for filename, keys in merged.files.items():
            specs = {k: merged.specs[k] for k in keys}
            write_streaming(tmp / filename, specs, produce, metadata={"format": "pt"})

    with rdv.heartbeat():
        try:
            publish(destination, fill)
        except Exception as exc:
            error = exc
            if isinstance(exc, OSError):
                error = SaveError(
                    f"shardsave.save_merged: writing {destination} failed: {type(exc).__name__}: {exc}. Nothing was "
                    f"published; choose a writable save_directory with free space."
                )
                error.__cause__ = exc
            for _, key in order[done:]:  # the others are sending: take part in every remaining gather
                try:
                    gather(key)
                except Exception:
                    break
    if ranks.distributed:
        rdv.post("done", status_of(error))
    if error is not None:
        raise error
    logger.info("saved the merged model (%d tensors, %d files) to %s in %.2f s", len(order), len(merged.files),
                destination, time.perf_counter() - started, extra={"writer": True})  # fmt: skip


def _stage_files(
    rdv: Rendezvous, merged: _Merged, writer: int, destination: Path, required: bool | None
) -> Path | None:
    """The writer stages the folder: texts, and each safetensors file as its header and its full (sparse) size;
    every rank then checks that it sees it. Returns the staged folder when all do (each rank writes its runs
    there), None when some rank does not (the runs stream to the writer instead; `required`: an error)."""
    ranks = rdv.ranks
    if ranks.rank == writer:
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
    try:
        shared = rdv.agree("visible", {"sees": sees}, own=error, decide=_all_see)
    except BaseException:
        if ranks.rank == writer:
            discard(tmp)
        raise
    if not shared and ranks.rank == writer:
        discard(tmp)
    return tmp if shared else None


def _all_see(statuses: dict[int, dict]) -> bool:
    return all(status["sees"] for status in statuses.values())


def _mine(runs: _MergedRuns, key: str, world_size: int) -> list[Slice]:
    """The runs of `key` this rank writes: the runs it sends; a tensor every rank holds whole, by one rank picked
    from its name (the work spread over the ranks)."""
    slices = runs.slices(key)
    if slices is None:
        owner = zlib.crc32(key.encode()) % world_size
        return [Slice(owner, 0, math.prod(runs.merged.specs[key].shape))] if owner == runs.rank else []
    return [s for s in slices if s.rank == runs.rank and s.stop > s.start]


def _write_in_place(rdv, merged: _Merged, runs: _MergedRuns, order, writer: int, destination: Path, tmp: Path,
                    gather) -> None:  # fmt: skip
    """Every rank writes its merged runs into the staged files (pwrite at their offsets) and fsyncs them; DoRA
    tensors whose runs cut rows are gathered and written by the writer. Then the writer publishes."""
    ranks = rdv.ranks
    offsets = {f: file_layout({k: merged.specs[k] for k in keys}, metadata={"format": "pt"})[1]
               for f, keys in merged.files.items()}  # fmt: skip
    fds: dict[str, int] = {}
    error = None
    try:
        for filename, key in order:
            if key in merged.whole_on_writer:
                tensor = gather(key)
                pieces = [] if tensor is None else [(0, tensor.reshape(-1))]
            else:
                pieces = []
                for piece in _mine(runs, key, ranks.world_size):
                    if runs.slices(key) is None:
                        pieces.append((0, runs.whole(key)))
                    else:
                        pieces.append((piece.start, runs.local(key, piece)))
            itemsize = merged.specs[key].dtype.itemsize
            for start, data in pieces:
                if filename not in fds:
                    fds[filename] = os.open(tmp / filename, os.O_WRONLY)
                raw = data.detach().to("cpu").contiguous().view(torch.uint8).numpy()
                view, at = memoryview(raw), offsets[filename][key] + start * itemsize
                while view.nbytes:
                    written = os.pwrite(fds[filename], view, at)
                    view, at = view[written:], at + written
        for fd in fds.values():
            os.fsync(fd)
    except Exception as exc:
        error = exc
        if isinstance(exc, OSError):
            error = SaveError(f"shardsave.save_merged: rank {ranks.rank} writing into {tmp} failed: "
                              f"{type(exc).__name__}: {exc}. Nothing was published.")  # fmt: skip
            error.__cause__ = exc
    finally:
        for fd in fds.values():
            os.close(fd)
    try:
        rdv.agree("written", {}, own=error)
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
