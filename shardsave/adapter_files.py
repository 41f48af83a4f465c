"""A saved adapter as element ranges on disk: which tensors it has, and any range of any of them, read alone.

Loading into a sharded model (`shardsave.load`) needs, on each rank, only the elements that rank holds. A
safetensors file stores each tensor's bytes at an offset its header gives; a shard set (`shardsave.shards`)
stores runs of elements whose offsets its headers give. Both are "runs of the flattened tensor at byte offsets
in files", so one reader serves both, and `shardsave.plan.read_items` says which runs a range needs: whatever
world size and backend saved the adapter, a rank reads only its own bytes. A `.bin` (a pickle) is read only
when allowed, weights-only and memory-mapped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .names import path_component
from .plan import read_items
from .stream import TensorSpec, dtype_from_name, read_header
from .writer import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME

__all__ = ["AdapterFilesError", "AdapterFiles", "open_adapter"]


class AdapterFilesError(ValueError):
    """The adapter cannot be read from `path`; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class _Run:
    start: int  # elements [start, stop) of the flattened tensor
    stop: int
    path: Path
    offset: int  # byte offset of element `start` in the file


@dataclass
class AdapterFiles:
    """One adapter of a saved folder or shard set: its config, its tensors' shapes and dtypes, their runs."""

    path: Path  # what was opened: the adapter folder, or the shard set
    kind: str  # "safetensors" | "bin" | "shards"
    config: dict  # adapter_config.json as saved
    specs: dict[str, TensorSpec]  # checkpoint key -> full shape and dtype, in the file's order
    runs: dict[str, list[_Run]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # `.bin`: memory-mapped

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements `[start, stop)` of the flattened tensor `key`, as a new 1-D CPU tensor in the saved dtype."""
        spec = self.specs[key]
        if self.kind == "bin":
            return self.tensors[key].reshape(-1)[start:stop].clone()
        out = torch.empty(stop - start, dtype=spec.dtype)
        if stop <= start:
            return out
        runs = self.runs[key]
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        size = spec.dtype.itemsize
        try:
            items = read_items([(r.start, r.stop) for r in runs], start, stop)
        except ValueError as exc:
            raise AdapterFilesError(f"{self.path}: {key}: {exc}.") from None
        for item in items:
            run = runs[item.run]
            lo, n = (item.start - start) * size, (item.stop - item.start) * size
            with open(run.path, "rb") as f:
                got = os.preadv(f.fileno(), [view[lo : lo + n]], run.offset + item.offset * size)
            if got != n:
                raise AdapterFilesError(
                    f"{run.path}: ended before byte {run.offset + item.offset * size + n}: truncated."
                )
        return out


def _adapter_folder(path: Path, adapter_name: str) -> Path | None:
    """The folder holding the adapter's config: `path/<adapter_name>` (PEFT's layout for a non-default adapter
    saved beside others) when there is one, else `path` itself (a folder of that adapter alone)."""
    if adapter_name != "default":  # the folder PEFT would read it from: `path/<adapter_name>`
        fix = "Pass the name of an adapter saved in that folder (adapter_name, --selected-adapters)."
        path_component(adapter_name, source=path, error=AdapterFilesError, fix=fix)
    if adapter_name != "default" and (path / adapter_name / CONFIG_NAME).is_file():
        return path / adapter_name
    if (path / CONFIG_NAME).is_file():
        return path
    return None


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterFilesError(f"{path}: unreadable ({exc}).") from None
    if not isinstance(config, dict):
        raise AdapterFilesError(f"{path}: holds {type(config).__name__}, not a JSON object.")
    return config


def _open_folder(folder: Path, allow_pickle: bool) -> AdapterFiles:
    config = _read_config(folder / CONFIG_NAME)
    safetensors = folder / SAFETENSORS_NAME
    if safetensors.is_file():
        try:
            _, stored = read_header(safetensors)
        except ValueError as exc:
            raise AdapterFilesError(str(exc)) from None
        specs, runs = {}, {}
        for key, (dtype, offset, nbytes, shape) in stored.items():
            spec = TensorSpec(shape, dtype_from_name(dtype))
            if spec.nbytes != nbytes:
                raise AdapterFilesError(f"{safetensors}: {key} has {nbytes} bytes for {spec}; the file is corrupt.")
            specs[key] = spec
            runs[key] = [_Run(0, math.prod(spec.shape), safetensors, offset)]
        return AdapterFiles(folder, "safetensors", config, specs, runs)
    binary = folder / BIN_NAME
    if not binary.is_file():
        raise AdapterFilesError(f"{folder}: has {CONFIG_NAME} but neither {SAFETENSORS_NAME} nor {BIN_NAME}.")
    if not allow_pickle:
        raise AdapterFilesError(
            f"{binary}: a pickle, and shardsave does not unpickle files unless asked (loading a pickle can run "
            f"code). Pass allow_pickle=True to read it with torch.load(weights_only=True), or save as safetensors."
        )
    try:
        tensors = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise AdapterFilesError(f"{binary}: not loadable with torch.load(weights_only=True) ({exc}).") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterFilesError(f"{binary}: holds {type(tensors).__name__}, not a dict of named tensors.")
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return AdapterFiles(folder, "bin", config, specs, tensors=tensors)


def _open_shards(directory: Path, adapter_name: str) -> AdapterFiles:
    from .merge import read_shard_set

    try:
        shard_set = read_shard_set(directory)
    except ValueError as exc:
        raise AdapterFilesError(str(exc)) from None
    names = list(shard_set.adapters)
    name = adapter_name if adapter_name in names else (names[0] if len(names) == 1 else None)
    if name is None:
        raise AdapterFilesError(
            f"{directory}: the shard set holds adapters {names}, none named {adapter_name!r}; pass adapter_name."
        )
    adapter = shard_set.adapters[name]
    config = json.loads(adapter["config"])
    specs = {key: shard_set.specs[name][key] for key in adapter["keys"]}
    runs = {
        key: [_Run(r.start, r.stop, r.path, r.offset) for r in shard_set.runs.get((name, key), [])]
        for key in adapter["keys"]
    }
    return AdapterFiles(directory, "shards", config, specs, runs)


def open_adapter(path: str | os.PathLike, adapter_name: str = "default", *, allow_pickle: bool = False) -> AdapterFiles:
    """The adapter saved at `path`: a PEFT adapter folder (PEFT's or shardsave's, safetensors or `.bin`), the
    folder of a save holding `adapter_name` in a subfolder, or a shardsave shard set (any world size; validated
    and checksummed as the merge does). Headers only: no tensor is read until `AdapterFiles.read`."""
    from .shards import MANIFEST_NAME

    root = Path(os.path.abspath(os.fspath(path)))
    if not root.is_dir():
        raise AdapterFilesError(f"{root}: {'does not exist' if not root.exists() else 'not a folder'}.")
    if (root / MANIFEST_NAME).is_file():
        return _open_shards(root, adapter_name)
    folder = _adapter_folder(root, adapter_name)
    if folder is None:
        raise AdapterFilesError(
            f"{root}: no {CONFIG_NAME} here"
            + (f" or in {adapter_name}/" if adapter_name != "default" else "")
            + " and no shard set (manifest.json). Pass the folder save_pretrained or PeftModel.save_pretrained wrote, "
            "or a shard set; for a DeepSpeed or DCP checkpoint, rescue the adapter first: python -m shardsave.merge "
            "CHECKPOINT -o ADAPTER."
        )
    return _open_folder(folder, allow_pickle)
