"""The PEFT adapter folder, read: which adapters it holds, their configs, weights files and tensors; one pickle gate.

Every reader of an adapter folder goes through here (`load_pretrained`, `verify`, `merge_into`, the PiSSA
conversion's initial adapter), so a `.bin` (a pickle) is refused in one place (`pickle_gate`: only with
`allow_pickle`, and then only through `torch.load(weights_only=True)`, memory-mapped where the file allows).
Each caller keeps the messages its users know: the functions take the error class to raise (`error`, default
`AdapterFilesError`) and, where the fix names the caller's own option, the sentence that says it (`fix`).

`open_adapter` opens an adapter for range reads (`shardsave.formats.runs.AdapterFiles`): a folder (PEFT's or
shardsave's, safetensors or `.bin`), the folder of a save holding it in a subfolder, or a shard set
(`shardsave.formats.shard_index`). Reads go through `shardsave.storage.reads`; safetensors' `safe_open` and
`torch.load` take a local path (their memory maps need one).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from shardsave.errors import AdapterFilesError
from shardsave.formats.runs import AdapterFiles, ElementRun
from shardsave.formats.shard_index import open_indexed, open_shards, shard_index
from shardsave.formats.shard_set import MANIFEST_NAME
from shardsave.plan.names import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, path_component
from shardsave.storage.reads import read_text
from shardsave.storage.streaming import TensorSpec, dtype_from_name, read_header

__all__ = [
    "AdapterFilesError",
    "AdapterFiles",
    "adapters_in",
    "read_config",
    "find_weights",
    "weights_file",
    "pickle_gate",
    "load_pickle",
    "safetensors_names",
    "iter_tensors",
    "tensor_shapes",
    "read_tensors",
    "open_adapter",
    "is_shard_set",
    "shard_index",
    "open_indexed",
]

Error = type[Exception]


def adapters_in(root: Path) -> list[tuple[str, Path]]:
    """`(name, folder)` of every adapter PEFT would load from `root`: `default` at the root, others below."""
    found = [("default", root)] if (root / CONFIG_NAME).exists() else []
    found += sorted((p.name, p) for p in root.iterdir() if p.is_dir() and (p / CONFIG_NAME).exists())
    return found


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


def read_config(path: Path, *, error: Error = AdapterFilesError, fix: str = "") -> dict:
    """`adapter_config.json` at `path`, which must hold a JSON object; `fix` ends the message of an unreadable one."""
    try:
        config = json.loads(read_text(path))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path}: unreadable ({exc}){fix}.") from None
    if not isinstance(config, dict):
        raise error(f"{path}: holds {type(config).__name__}, not a JSON object.")
    return config


def find_weights(folder: Path) -> Path | None:
    """The adapter's weights file in `folder`: safetensors, else `.bin`; None when neither is there."""
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def weights_file(folder: Path, *, error: Error = AdapterFilesError) -> Path:
    """`find_weights`, for a folder that holds the config: the weights must be there too."""
    path = find_weights(folder)
    if path is None:
        raise error(f"{folder}: has {CONFIG_NAME} but neither {SAFETENSORS_NAME} nor {BIN_NAME}.")
    return path


def pickle_gate(path: Path, *, allow_pickle: bool, fix: str, what: str = "a pickle", error: Error) -> None:
    """Refuse the pickle `path` (`what` it is) unless `allow_pickle`: loading a pickle can run code. `fix` names
    the caller's option."""
    if not allow_pickle:
        raise error(
            f"{path}: {what}, and shardsave does not unpickle files unless asked (loading a pickle can run code). "
            + fix
        )


def load_pickle(
    path: Path,
    *,
    allow_pickle: bool,
    fix: str,
    what: str = "a pickle",
    error: Error = AdapterFilesError,
    expect: str | None = "a dict of named tensors",
    legacy: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of the pickle `path`, past `pickle_gate`: `torch.load(weights_only=True)`, memory-mapped.
    `legacy`: the legacy non-zip format too, loaded whole (it cannot be memory-mapped). `expect`: what it must
    hold, named in the message (None: as loaded)."""
    pickle_gate(path, allow_pickle=allow_pickle, fix=fix, what=what, error=error)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if not legacy or "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(f"{path}: not loadable with torch.load(weights_only=True) ({exc}).") from None
    named = isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    if expect is not None and not named:
        raise error(f"{path}: holds {type(state).__name__}, not {expect}.")
    return state


def safetensors_names(path: Path, *, error: Error = AdapterFilesError) -> list[str]:
    """The tensor names of a safetensors file, once safetensors has checked its header's bounds and that the data
    fills the file exactly."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise error(f"{path}: not a readable safetensors file ({exc}); it is truncated or corrupt.") from None


def iter_tensors(
    path: Path, *, allow_pickle: bool, fix: str, error: Error = AdapterFilesError
) -> Iterator[tuple[str, torch.Tensor]]:
    """`(key, tensor)` one at a time, memory-mapped (a legacy `.bin`: loaded whole): one tensor in memory at a time."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        keys = safetensors_names(path, error=error)
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in keys:
                    yield key, f.get_tensor(key)
        except Exception as exc:
            raise error(f"{path}: reading its tensors failed ({exc}); the file is corrupt.") from None
        return
    yield from load_pickle(path, allow_pickle=allow_pickle, fix=fix, error=error, legacy=True).items()


def tensor_shapes(
    path: Path, *, allow_pickle: bool, fix: str, error: Error = AdapterFilesError
) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from a safetensors header alone (the file must be readable: `safetensors_names`)."""
    if path.suffix != ".safetensors":
        return {k: tuple(t.shape) for k, t in iter_tensors(path, allow_pickle=allow_pickle, fix=fix, error=error)}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def read_tensors(
    path: Path, *, allow_pickle: bool, fix: str, what: str = "a pickle", error: Error, expect: str
) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file, in memory (safetensors) or memory-mapped (`.bin`, through the gate)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise error(f"{path}: not a readable safetensors file ({exc}).") from None
    return load_pickle(path, allow_pickle=allow_pickle, fix=fix, what=what, error=error, expect=expect, legacy=True)


def _open_folder(folder: Path, allow_pickle: bool) -> AdapterFiles:
    config = read_config(folder / CONFIG_NAME)
    path = weights_file(folder)
    if path.name == BIN_NAME:
        fix = "Pass allow_pickle=True to read it with torch.load(weights_only=True), or save as safetensors."
        tensors = load_pickle(path, allow_pickle=allow_pickle, fix=fix)
        specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in tensors.items()}
        return AdapterFiles(folder, "bin", config, specs, tensors=tensors)
    try:
        _, stored = read_header(path)
    except ValueError as exc:
        raise AdapterFilesError(str(exc)) from None
    specs, runs = {}, {}
    for key, (dtype, offset, nbytes, shape) in stored.items():
        spec = TensorSpec(shape, dtype_from_name(dtype))
        if spec.nbytes != nbytes:
            raise AdapterFilesError(f"{path}: {key} has {nbytes} bytes for {spec}; the file is corrupt.")
        specs[key] = spec
        runs[key] = [ElementRun(0, math.prod(spec.shape), path, offset)]
    return AdapterFiles(folder, "safetensors", config, specs, runs)


def is_shard_set(path: str | os.PathLike) -> bool:
    """Whether `path` is a shard set (a folder holding a manifest), as `open_adapter` decides."""
    return (Path(os.path.abspath(os.fspath(path))) / MANIFEST_NAME).is_file()


def open_adapter(path: str | os.PathLike, adapter_name: str = "default", *, allow_pickle: bool = False) -> AdapterFiles:
    """The adapter saved at `path`: a PEFT adapter folder (PEFT's or shardsave's, safetensors or `.bin`), the
    folder of a save holding `adapter_name` in a subfolder, or a shardsave shard set (any world size; validated
    and checksummed as the merge does). Headers only: no tensor is read until `AdapterFiles.read`."""
    root = Path(os.path.abspath(os.fspath(path)))
    if not root.is_dir():
        raise AdapterFilesError(f"{root}: {'does not exist' if not root.exists() else 'not a folder'}.")
    if (root / MANIFEST_NAME).is_file():
        return open_shards(root, adapter_name)
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
