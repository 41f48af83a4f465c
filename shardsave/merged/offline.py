"""Merge an adapter into a local base model's weights, offline, one tensor at a time.

    python -m shardsave.merge SRC --into BASE -o OUT [--dtype ...] [--max-shard-size 5GB] [--allow-pickle]

Writes what `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE, dtype=...), SRC)
.merge_and_unload().save_pretrained(OUT, max_shard_size=...)` writes: config.json, generation_config.json, the
merged tensors under the base model's keys (tied copies left out), sharded by the same rule
(`huggingface_hub.split_torch_state_dict_into_shards`) with the same index and `{"format": "pt"}` metadata.
The arithmetic is `shardsave.tensors.merge_math`'s (PEFT's). Only the adapter is held whole; each base tensor is read,
merged and written alone (tensors the adapter does not change are copied by the kernel), so memory stays
around twice the largest tensor plus the adapter. Everything is checked before anything is written; the
output is published atomically (`shardsave.storage.local.publish`).

What the base model's class decides (the keys save_pretrained writes and their order, the tied ones, the config
files) comes from its files alone where they prove it (`shardsave.formats.hf_base`: a plain causal LM saved by the
installed transformers, merged into one file), and transformers is not imported; otherwise from the class built
on the meta device by transformers (`_described_by_class`). Both give the same bytes (tests/merged/test_offline.py).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shardsave.compat import hf_saved_keys
from shardsave.errors import MergedError
from shardsave.formats.adapter import AdapterFiles, AdapterFilesError, open_adapter
from shardsave.formats.hf_base import GENERATION_CONFIG, describe_plain_base
from shardsave.formats.hf_model import (
    DTYPES,
    MODEL_CONFIG,
    ModelFiles,
    read_model_files,
    split_files,
    write_model_files,
)
from shardsave.log import logger
from shardsave.plan.merge_steps import MergeRefused, Step, plan_merge
from shardsave.storage.files import remove_scratch, scratch_directory, write_text
from shardsave.storage.local import check_destination, check_overwrite, publish
from shardsave.storage.streaming import FileRange, TensorSpec, file_order, write_streaming
from shardsave.storage.sync import BackgroundSync
from shardsave.tensors.merge_math import merge_dtype, merge_tensor

__all__ = ["MergedError", "merge_into"]


def _adapters(
    source: Path, selected: Sequence[str] | None, allow_pickle: bool, scratch: Path, base: Path
) -> list[AdapterFiles]:
    """The adapters to merge, in order: from an adapter folder or shard set directly, from a framework checkpoint
    through the rescue (into `scratch`), whose structure checks are made on `base`, the model merged into."""
    from shardsave.formats.sources import detect_source
    from shardsave.rescue.checkpoint import RescueError, rescue_adapter

    try:
        found = detect_source(source)
    except RescueError:
        found = None  # an adapter folder (or nothing usable: open_adapter says what)
    if found is not None and found.kind != "shards":
        try:
            rescue_adapter(found.given, scratch / "adapter", base=base, allow_pickle=allow_pickle)
        except RescueError as exc:
            raise MergedError(str(exc)) from None
        source = scratch / "adapter"
    names = list(selected) if selected else ["default"]
    out = []
    for name in names:
        try:
            out.append(open_adapter(source, name, allow_pickle=allow_pickle))
        except AdapterFilesError as exc:
            raise MergedError(str(exc)) from None
    return out


#: Whether a base the files alone describe is merged without transformers (tests switch it off to compare).
_DESCRIBE_FROM_FILES = True


@dataclass
class _Base:
    """What the merge needs of the base model's class: the keys `save_pretrained` writes (in its order where
    `model` is the class built), every weight's shape, the tied keys, the merged dtype, the parameter count and
    the config files."""

    keys: list[str]
    shapes: dict[str, tuple]
    tied: dict[str, str]
    dtype: torch.dtype
    parameters: Callable[[], int] | None  # the parameter count (the index's), where the class is built
    write_configs: Callable[[Path, dict | None], None]  # (staging folder, the shards' index)
    model: object | None = None  # the class built on the meta device, or None (described from the files)


def _describe(files: ModelFiles, dtype: torch.dtype | None) -> _Base:
    """The base from its files alone where they prove what transformers would write (no transformers imported:
    `shardsave.formats.hf_base`), else from its class built by transformers."""
    plain = describe_plain_base(files, dtype) if _DESCRIBE_FROM_FILES else None
    if plain is None:
        return _described_by_class(files, dtype)

    def write_configs(tmp: Path, index: dict | None) -> None:
        assert index is None, "an output described from the files is one file"  # the order is not known
        write_text(tmp / MODEL_CONFIG, plain.config_text)
        write_text(tmp / GENERATION_CONFIG, plain.generation_text)

    return _Base(plain.keys, plain.shapes, plain.tied, plain.dtype, None, write_configs)


def _described_by_class(files: ModelFiles, dtype: torch.dtype | None) -> _Base:
    """The base from its class, built on the meta device by transformers; refuses weights that do not fit it."""
    model, out_dtype, generation = _model_skeleton(files, dtype)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    written = _saved_keys(model)
    missing = [k for k in written if k not in files.specs]
    if missing:
        raise MergedError(
            f"{files.folder}: lacks {missing[:3]} ({len(missing)} of the model's tensors); a partial or foreign "
            f"checkpoint. Pass a complete model folder."
        )
    wrong = [k for k in written if files.specs[k].shape != shapes[k]]
    if wrong:
        raise MergedError(f"{files.folder}: {wrong[0]} is {list(files.specs[wrong[0]].shape)}, the config makes it "
                          f"{list(shapes[wrong[0]])}; the weights do not fit config.json.")  # fmt: skip

    def write_configs(tmp: Path, index: dict | None) -> None:
        write_model_files(tmp, model.config, dtype=out_dtype, architecture=type(model).__name__,
                          generation=generation, index=index)  # fmt: skip

    return _Base(written, shapes, tied, out_dtype, model.num_parameters, write_configs, model)


def _output_specs(base: _Base, files: ModelFiles) -> dict[str, TensorSpec]:
    """The merged weights, in the order `save_pretrained` writes them: floating ones in the merged dtype."""
    stored = files.specs
    return {k: TensorSpec(base.shapes[k], base.dtype if stored[k].dtype.is_floating_point else stored[k].dtype)
            for k in base.keys}  # fmt: skip


def _model_skeleton(base: ModelFiles, dtype: torch.dtype | None):
    """The model class `from_pretrained` would build, on the meta device: its keys in order, the tied ones, its
    parameter count, and the config and generation config it would save."""
    from transformers import AutoConfig, GenerationConfig

    from shardsave.plan.skeleton import meta_model

    try:
        config = AutoConfig.from_pretrained(str(base.folder))
    except Exception as exc:
        raise MergedError(f"{base.folder / MODEL_CONFIG}: transformers cannot read it ({exc}).") from None
    if dtype is None:
        dtype = getattr(config, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            dtype = next((s.dtype for s in base.specs.values() if s.dtype.is_floating_point), torch.float32)
    try:
        model = meta_model(config, "AutoModelForCausalLM", dtype=dtype)
    except Exception as exc:
        raise MergedError(f"{base.folder}: not a causal language model transformers can build ({exc}).") from None
    generation = None
    if model.can_generate():
        path = base.folder / "generation_config.json"
        generation = GenerationConfig.from_pretrained(str(base.folder)) if path.is_file() else model.generation_config
    return model, dtype, generation


def _saved_keys(model) -> list[str]:
    """The keys `save_pretrained` writes for a model `from_pretrained` loaded from a checkpoint holding the model's
    own keys, in its order (which the sharding follows): tied copies left out, then transformers' reverse key
    conversion, which (with no conversion recorded, as from_pretrained records for such a checkpoint) reorders."""
    model._weight_conversions = []  # what from_pretrained records when no conversion matched the checkpoint
    return hf_saved_keys(model)


def _check_fit(plan: dict[str, list[Step]], shapes: dict[str, tuple], tied: dict[str, str], adapters, owner) -> None:
    where = ", ".join(str(a.path) for a in adapters)
    for key, steps in plan.items():
        if key in tied:
            raise MergedError(
                f"{where}: changes {key}, which this base ties to {tied[key]}; PEFT's merge would untie them. Untie "
                f"the base first (tie_word_embeddings=False, lm_head copied) and merge into that."
            )
        if key not in shapes:
            raise MergedError(
                f"{where}: does not fit the base: it changes {key}, which the base model does not have (another "
                f"base model, or other target modules?). Pass the base the adapter was trained on."
            )
        if key in tied.values() and any(s.kind in ("tokens", "replace") for s in steps):
            raise MergedError(f"{where}: changes the tied embedding {key} by copy; PEFT's merge would untie it.")
        for step in steps:
            specs = owner[step.adapter].specs
            expect = _expected_shapes(step, shapes[key], {r: specs[n].shape for r, n in step.tensors.items()})
            for role, want in expect.items():
                shape = tuple(specs[step.tensors[role]].shape)
                if shape != want:
                    raise MergedError(
                        f"{where}: does not fit the base: {step.tensors[role]} is {list(shape)}, but {key} "
                        f"{list(shapes[key])} needs {list(want)}. Pass the base the adapter was trained on."
                    )


def _expected_shapes(step: Step, shape: tuple, given: dict[str, tuple]) -> dict[str, tuple]:
    """The shape each of the step's tensors must have on a base tensor of `shape` (the rank from lora_A's)."""
    if step.kind == "replace":
        return {"value": shape}
    if step.kind == "bias":
        return {"bias": shape}
    if step.kind == "tokens":
        return {"delta": (len(step.token_indices), *shape[1:])}
    if len(shape) != 2:
        return {}  # refused by name when merged
    r = given["A"][0] if given["A"] else 0
    rows, cols = shape
    if step.kind == "embedding":  # lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r)
        return {"A": (r, rows), "B": (cols, r)}
    out, inner = (cols, rows) if step.fan_in_fan_out else (rows, cols)
    return {"A": (r, inner), "B": (out, r), **({"magnitude": (out,)} if step.dora else {})}


def merge_into(
    source: str | os.PathLike,
    base: str | os.PathLike,
    output: str | os.PathLike,
    *,
    selected_adapters: Sequence[str] | None = None,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write to `output` the base model `base` (a local Hugging Face folder) with the adapter(s) from `source`
    merged in (an adapter folder, a shard set, or a DeepSpeed / DCP checkpoint, rescued first), as
    `merge_and_unload().save_pretrained(output, max_shard_size=...)` would; return its path.

    `selected_adapters`: the adapters of a folder saved with several (PEFT's layout), merged in that order
    (default: the root one). `dtype`: "auto" or a dtype name, as `from_pretrained(dtype=)`. Raises
    `MergedError` (nothing written) for anything that does not fit; `OSError` when writing fails (nothing
    published)."""

    started = time.perf_counter()
    if dtype not in DTYPES:
        raise MergedError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}.")
    source_path, base_path = Path(os.path.abspath(source)), Path(os.path.abspath(base))
    if not base_path.is_dir():
        raise MergedError(f"{base_path}: {'does not exist' if not base_path.exists() else 'not a folder'} (--into).")
    destination = check_destination(output)
    check_overwrite(destination, overwrite, MergedError)
    for given in (source_path, base_path):
        if destination == given or destination in given.parents or given in destination.parents:
            raise MergedError(f"{destination}: overlaps {given}; write the merged model elsewhere.")
    files = read_model_files(base_path, allow_pickle=allow_pickle, error=MergedError)
    base = _describe(files, DTYPES[dtype])
    written = base.keys

    scratch = scratch_directory(".shardsave-merge-", near=destination.parent)
    try:
        adapters = _adapters(source_path, selected_adapters, allow_pickle, scratch, base_path)
        names = list(selected_adapters) if selected_adapters else ["default"]
        try:
            plan = plan_merge([(n, a.config, list(a.specs)) for n, a in zip(names, adapters, strict=True)])
        except MergeRefused as exc:
            raise MergedError(f"{source_path}: {exc}") from None
        owner = dict(zip(names, adapters, strict=True))
        _check_fit(plan, base.shapes, base.tied, adapters, owner)
        specs = _output_specs(base, files)
        shards, index = split_files(specs, max_shard_size, base.parameters() if base.parameters else 0)
        if index is not None and base.model is None:  # sharded: the split follows save_pretrained's key order
            base = _described_by_class(files, DTYPES[dtype])  # the same keys, shapes and tied ones (tested)
            specs, written = _output_specs(base, files), base.keys
            shards, index = split_files(specs, max_shard_size, base.parameters())
        adapter_tensors = _adapter_tensors(plan, owner, specs)

        def copied(key: str) -> bool:  # the bytes as stored, copied by the kernel
            return not plan.get(key) and key in files.offsets and files.specs[key].dtype == specs[key].dtype

        def compute(key: str) -> torch.Tensor:
            # a memory-mapped pickle's tensor is copied before it is changed in place
            tensor = files.read(key).to(specs[key].dtype, copy=files.files[key] in files.pickled)
            steps = plan.get(key, [])
            return merge_tensor(tensor, specs[key].shape, steps, adapter_tensors) if steps else tensor

        def cost(key: str) -> int:  # bytes held while computing: the tensor read, its new dtype, a delta (scaled)
            converted = specs[key].nbytes if files.specs[key].dtype != specs[key].dtype else 0
            return files.specs[key].nbytes + converted + (8 * math.prod(specs[key].shape) if key in plan else 0)

        order = [k for keys in shards.values() for k in file_order({k: specs[k] for k in keys})]
        computed = [k for k in order if not copied(k)]
        # within the bound of the issue (twice the largest tensor), and at most two tensors' work ahead
        largest = max(s.nbytes for s in [*files.specs.values(), *specs.values()])
        budget = min(2 * largest, 2 * max(map(cost, computed), default=0))
        # one intra-op thread while merging (restored after): the arithmetic is a few memory-bound passes over one
        # tensor, overlapped with the main thread's kernel copies; a thread pool on top made each op wait for a
        # descheduled thread at its barrier (10x slower on a busy 2-core machine, benchmarks/README.md)
        threads = torch.get_num_threads()
        ahead: _Ahead | None = None

        def produce(key: str) -> torch.Tensor | list[FileRange]:
            ahead.written()  # the previous tensor is in the file: its memory is free
            if copied(key):
                return [FileRange(files.files[key], files.offsets[key], specs[key].nbytes)]
            return ahead.take(key)

        def fill(tmp: Path) -> None:
            base.write_configs(tmp, index)
            with BackgroundSync() as sync:
                for filename, keys in shards.items():
                    write_streaming(tmp / filename, {k: specs[k] for k in keys}, produce, metadata={"format": "pt"})
                    sync(tmp / filename)

        try:  # the thread count is restored whatever fails, starting the worker included
            torch.set_num_threads(1)
            ahead = _Ahead(computed, compute, cost, lambda k: specs[k].nbytes, budget)
            publish(destination, fill)
        finally:
            if ahead is not None:
                ahead.close()
            torch.set_num_threads(threads)
    finally:
        remove_scratch(scratch)
    changed = sum(1 for k in written if k in plan)
    logger.info("merged %d adapter(s) into %d of %d tensors of %s into %s in %.2f s", len(adapters), changed,
                len(written), base_path, destination, time.perf_counter() - started)  # fmt: skip
    return destination


class _Ahead:
    """Computes the tensors the writer needs in memory (merged or converted) on a worker thread, in the order the
    writer asks for them, ahead of it: the arithmetic overlaps the kernel's copying of the unchanged tensors
    (and the fsyncs). What is computed and not yet written stays within `budget` bytes (`cost` while a tensor
    is computed, `kept` once done), so memory stays within twice the largest tensor; one tensor dearer than the
    budget is computed alone."""

    def __init__(self, keys: list[str], compute: Callable[[str], torch.Tensor], cost: Callable[[str], int],
                 kept: Callable[[str], int], budget: int) -> None:  # fmt: skip
        self._keys, self._compute, self._cost, self._kept, self._budget = keys, compute, cost, kept, budget
        self._done: dict[str, torch.Tensor] = {}
        self._held = 0
        self._last: str | None = None  # handed to the writer, not yet written
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="shardsave-merge", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for key in self._keys:
                cost = self._cost(key)
                with self._cond:
                    self._cond.wait_for(lambda c=cost: self._stop or self._held == 0 or self._held + c <= self._budget)
                    if self._stop:
                        return
                    self._held += cost
                tensor = self._compute(key)
                with self._cond:
                    self._held += self._kept(key) - cost
                    self._done[key] = tensor
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the writer, which raises it
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def take(self, key: str) -> torch.Tensor:
        """The tensor of `key` (the next one in order), once computed; raises what computing it raised."""
        with self._cond:
            self._cond.wait_for(lambda: key in self._done or self._error is not None)
            if key not in self._done:
                raise self._error
            self._last = key
            return self._done.pop(key)

    def written(self) -> None:
        """The tensor last taken is written: its bytes no longer count."""
        with self._cond:
            if self._last is not None:
                self._held -= self._kept(self._last)
                self._last = None
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._done.clear()
            self._cond.notify_all()
        self._thread.join()


def _adapter_tensors(plan: dict[str, list[Step]], owner: dict[str, AdapterFiles], specs) -> dict:
    """(adapter, key) -> every adapter tensor the plan names, whole, in the dtype PEFT merges it in."""
    out = {}
    for key, steps in plan.items():
        for step in steps:
            for role, name in step.tensors.items():
                files = owner[step.adapter]
                spec = files.specs[name]
                tensor = files.read(name, 0, math.prod(spec.shape)).view(spec.shape)
                out[step.adapter, name] = tensor.to(merge_dtype(role, specs[key].dtype))
    return out
