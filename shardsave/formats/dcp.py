"""Read chosen tensors out of a torch.distributed.checkpoint (DCP) folder, touching only their bytes.

A DCP folder (what `dcp.save`, FSDP1 `SHARDED_STATE_DICT`, FSDP2 and accelerate / Trainer's
`pytorch_model_fsdp_0/` write) holds `.metadata` (a pickle: for each key its global shape, dtype and chunks,
each chunk an n-D box given by offsets and sizes) and `*.distcp` files. `.metadata.storage_data` says where
each chunk lives: a file, a byte offset and a length; the chunk there is one `torch.save` record of exactly
that box. So an adapter of a few MiB can be read out of a checkpoint of hundreds of GiB by reading
`.metadata`, then only the adapter's byte ranges: nothing of the base model is read, nothing executed.

Safety: `.metadata` is unpickled with an allowlist of exactly the classes DCP writes into it (its metadata
dataclasses, `torch.Size`, dtypes, the layout helper, a `pathlib` path); anything else is refused before it is
called, and an instance can only be filled in (pickle's BUILD) if it is of an allowlisted class. The chunks are
read with `torch.load(weights_only=True)`.

`dcp_tensors` of a folder fills inert stand-ins of those metadata classes (`_STAND_INS`: the same allowlist, the
same checks) instead of DCP's own: importing `torch.distributed.checkpoint` (its package imports all of DCP)
costs ~0.5-2 s, more than the rescue of a small adapter does; `read_dcp_metadata` returns DCP's own `Metadata`.
"""

from __future__ import annotations

import importlib
import io
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shardsave.errors import DCPError, UnsafeMetadataError
from shardsave.plan.names import canonical_name
from shardsave.storage.reads import file_size, open_binary

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

__all__ = [
    "METADATA_NAME",
    "DCPError",
    "UnsafeMetadataError",
    "DCPChunk",
    "DCPTensor",
    "read_dcp_metadata",
    "dcp_tensors",
    "canonical_keys",
    "read_tensors",
]

#: The file `dcp.save` writes last; its presence marks a finished checkpoint.
METADATA_NAME = ".metadata"

#: First key components of optimizer state (`get_state_dict`'s `optim.`, accelerate's `optimizer.`, a bare
#: optimizer state dict's `state.` / `param_groups.`): never model weights.
OPTIMIZER_COMPONENTS = frozenset({"optim", "optimizer", "state", "param_groups"})

#: Leading components that a wrapper or a framework puts before every key of the model: accelerate and
#: Trainer save `{"model": state_dict}` (keys `model.<fqn>`), DDP / DeepSpeed wrap the model as `module`.
#: Stripped only when every model key has it, so a model's own top-level `model` submodule is kept.
WHOLE_PREFIXES = ("model.", "module.")


@dataclass(frozen=True, slots=True)
class DCPChunk:
    """One saved box of a tensor and where its `torch.save` record lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # relative to the checkpoint folder
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DCPTensor:
    """A tensor of the checkpoint as `.metadata` describes it (nothing read from the `.distcp` files)."""

    key: str  # as saved
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[DCPChunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        """Bytes of its records in the `.distcp` files (what reading it costs)."""
        return sum(c.length for c in self.chunks)


# --- .metadata, unpickled with an allowlist --------------------------------------------------------------------

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP_METADATA: frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    # where older torch releases defined DCP's tensor properties
    "torch.distributed._shard.sharded_tensor.metadata": frozenset({"TensorProperties", "MEM_FORMAT_ENCODING"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),  # and every dtype, checked by type
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


class _StandIn:
    """An inert stand-in for one of DCP's metadata dataclasses: pickle's BUILD fills its `__dict__`."""


class _TensorPropertiesStandIn(_StandIn):
    def __setstate__(self, state) -> None:  # DCP's TensorProperties pickles a tuple (its memory format encoded)
        self.dtype, self.layout, self.requires_grad, self.memory_format, self.pin_memory = state


def _memory_format_stand_in(value):  # DCP's _MEM_FORMAT_ENCODING enum, called with its value
    return value


#: The fields DCP's dataclasses default (a pickled instance's state may lack them: the class attribute answers).
_DEFAULTS = {
    "MetadataIndex": {"offset": None, "index": None},
    "Metadata": {"planner_data": None, "storage_data": None, "storage_meta": None, "version": None},
    "_StorageInfo": {"transform_descriptors": None},
}
_STAND_INS: dict[str, object] = {
    **{name: type(name, (_StandIn,), dict(_DEFAULTS.get(name, {}))) for name in _ALLOWED[_DCP_METADATA]
       if name[0].isupper()},
    "_StorageInfo": type("_StorageInfo", (_StandIn,), dict(_DEFAULTS["_StorageInfo"])),
    "TensorProperties": type("TensorProperties", (_TensorPropertiesStandIn,), {}),
    "_MEM_FORMAT_ENCODING": _memory_format_stand_in,
    "MEM_FORMAT_ENCODING": _memory_format_stand_in,
}  # fmt: skip
_STAND_IN_MODULES = (
    _DCP_METADATA,
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed._shard.sharded_tensor.metadata",
)


class _MetadataUnpickler(pickle._Unpickler):  # the Python implementation: its BUILD step can be checked
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: Path, *, stand_ins: bool = False) -> None:
        super().__init__(file)
        self._path = path
        self._stand_ins = stand_ins
        self._buildable: set[type] = {OrderedDict}

    def find_class(self, module: str, name: str):
        allowed = module in _ALLOWED and name in _ALLOWED[module]
        found = None
        if allowed and self._stand_ins and module in _STAND_IN_MODULES:
            found = _STAND_INS[name]
        elif allowed or module == "torch":
            try:
                found = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                found = None
        if module == "torch" and not allowed:
            allowed = isinstance(found, torch.dtype)
        if not allowed:
            raise UnsafeMetadataError(
                f"{self._path}: refers to {module}.{name}, which is not one of the classes torch.distributed."
                f"checkpoint writes into its metadata; it was not loaded (a pickle can run code through such "
                f"a reference). Only load this checkpoint if you trust where it came from, with torch's own "
                f"torch.distributed.checkpoint.load."
            )
        if found is None:
            raise DCPError(
                f"{self._path}: refers to {module}.{name}, which this torch ({torch.__version__}) does not "
                f"have; the checkpoint was written by another torch release. Read it with that release."
            )
        if isinstance(found, type) and module != "pathlib":
            self._buildable.add(found)
        return found

    def load_build(self) -> None:
        target = self.stack[-2]  # the state to set is on top
        if type(target) not in self._buildable:
            raise UnsafeMetadataError(
                f"{self._path}: asks to set the attributes of {target!r}, which is not an instance of DCP's "
                f"metadata classes; it was not loaded."
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid):
        raise UnsafeMetadataError(f"{self._path}: holds a persistent reference, which DCP metadata never does.")


def read_dcp_metadata(folder: str | os.PathLike) -> Metadata:
    """The checkpoint's `Metadata`, unpickled with an allowlist of DCP's own classes (see the module doc)."""
    return _read_metadata(folder, stand_ins=False)


def _read_metadata(folder: str | os.PathLike, *, stand_ins: bool):
    folder = Path(folder)
    path = folder / METADATA_NAME
    if not path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {METADATA_NAME} file"
        raise DCPError(
            f"{folder}: {what}, so it is not a torch.distributed.checkpoint folder (or its save did not finish: "
            f"DCP writes {METADATA_NAME} last). Pass the folder holding {METADATA_NAME} and the *.distcp files."
        )
    with open_binary(path) as f:
        try:
            metadata = _MetadataUnpickler(f, path, stand_ins=stand_ins).load()
        except DCPError:
            raise
        except Exception as exc:
            raise DCPError(f"{path}: not a readable DCP metadata pickle ({type(exc).__name__}: {exc}).") from exc
    if not _is(metadata, "Metadata") or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise DCPError(f"{path}: holds a {type(metadata).__name__}, not torch.distributed.checkpoint Metadata.")
    if not isinstance(getattr(metadata, "storage_data", None), dict):
        raise DCPError(
            f"{path}: has no per-chunk storage information (storage_data); it was not written by DCP's "
            f"FileSystemWriter, whose layout this reader understands."
        )
    return metadata


def _is(obj: object, name: str) -> bool:
    """`obj` is an instance of DCP's metadata class `name`, or of its stand-in."""
    cls = type(obj)
    if isinstance(obj, _StandIn):
        return cls.__name__ == name
    return cls.__name__ == name and cls.__module__ == _DCP_METADATA


def _is_optimizer_key(key: str) -> bool:
    return key.partition(".")[0] in OPTIMIZER_COMPONENTS


def dcp_tensors(source: str | os.PathLike | Metadata) -> dict[str, DCPTensor]:
    """Every model tensor of the checkpoint (key as saved -> shape, dtype, chunks), from `.metadata` alone.

    Non-tensor entries (`BytesStorageMetadata`: step counters, RNG state, ...) and optimizer state
    (keys under `optim.`, `optimizer.`, `state.`, `param_groups.`) are left out.
    """
    metadata = _read_metadata(source, stand_ins=True) if isinstance(source, (str, os.PathLike)) else source
    where = {(i.fqn, tuple(i.offset or ())): info for i, info in metadata.storage_data.items()}
    out = {}
    for key, entry in metadata.state_dict_metadata.items():
        if _is(entry, "BytesStorageMetadata") or _is_optimizer_key(key):
            continue
        if not _is(entry, "TensorStorageMetadata"):
            raise DCPError(f"checkpoint key {key!r}: unknown entry type {type(entry).__name__} in {METADATA_NAME}.")
        chunks = []
        for chunk in entry.chunks:
            offsets = tuple(int(o) for o in chunk.offsets)
            info = where.get((key, offsets))
            if info is None:
                raise DCPError(
                    f"checkpoint key {key!r}: {METADATA_NAME} lists a chunk at offsets {offsets} but no file "
                    f"holding it; the metadata is damaged."
                )
            chunks.append(
                DCPChunk(
                    offsets,
                    tuple(int(s) for s in chunk.sizes),
                    str(info.relative_path),
                    int(info.offset),
                    int(info.length),
                    tuple(getattr(info, "transform_descriptors", None) or ()),
                )
            )
        out[key] = DCPTensor(key, tuple(int(s) for s in entry.size), entry.properties.dtype, tuple(chunks))
    return out


# --- names ------------------------------------------------------------------------------------------------------


def canonical_keys(keys: Iterable[str]) -> dict[str, str]:
    """Checkpoint key -> canonical parameter name, for the model keys of one checkpoint (a pure function).

    The rule: optimizer keys are dropped (see `dcp_tensors`); then, while every remaining key starts with
    `model.` (accelerate / Trainer save `{"model": state_dict}`) or `module.` (a DDP / DeepSpeed wrapper), that
    first component is removed; then `shardsave.plan.names.canonical_name` removes wrapper components anywhere
    (`_orig_mod`, `_checkpoint_wrapped_module`, `_fsdp_wrapped_module`). A leading component shared by only
    some keys is the model's own and is kept. Two keys that map to the same name are an error.
    """
    keys = [k for k in keys if not _is_optimizer_key(k)]
    stripped = list(keys)
    while stripped:
        lead = next((p for p in WHOLE_PREFIXES if all(k.startswith(p) for k in stripped)), None)
        if lead is None:
            break
        stripped = [k[len(lead) :] for k in stripped]
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key, short in zip(keys, stripped, strict=True):
        name = canonical_name(short)
        if name in seen:
            raise DCPError(
                f"checkpoint keys {seen[name]!r} and {key!r} both name the parameter {name!r} once wrapper "
                f"prefixes are removed; the checkpoint holds two copies of it and it is unclear which to use."
            )
        seen[name] = key
        out[key] = name
    return out


# --- chunks -----------------------------------------------------------------------------------------------------


def _check_cover(tensor: DCPTensor) -> None:
    """Every element of the tensor in exactly one chunk: boxes inside the shape, disjoint, volumes adding up."""
    shape = tensor.shape
    boxes = []
    for c in tensor.chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            raise DCPError(f"checkpoint key {tensor.key!r}: chunk at {c.offsets} has the wrong number of dimensions.")
        if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(c.offsets, c.sizes, shape, strict=True)):
            raise DCPError(
                f"checkpoint key {tensor.key!r}: chunk at offsets {c.offsets} with sizes {c.sizes} lies outside "
                f"the tensor's shape {shape}; the metadata is damaged."
            )
        if math.prod(c.sizes):
            boxes.append(c)
    covered = sum(math.prod(c.sizes) for c in boxes)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if all(
                ao < bo + bs and bo < ao + as_
                for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
            ):
                raise DCPError(
                    f"checkpoint key {tensor.key!r}: chunks at offsets {a.offsets} and {b.offsets} overlap; the "
                    f"metadata is damaged (DCP stores each element once)."
                )
    if covered != math.prod(shape):
        raise DCPError(
            f"checkpoint key {tensor.key!r}: its chunks cover {covered} of its {math.prod(shape)} elements; "
            f"part of the tensor was not saved (a rank's chunks are missing from {METADATA_NAME})."
        )


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + length) of an open file, for `torch.load`."""

    def __init__(self, file, start: int, length: int) -> None:
        super().__init__()
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._length - self._pos)
        if want <= 0:
            return 0
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(view[:want]) or 0
        self._pos += got
        return got


def _load_chunk(file, path: Path, tensor: DCPTensor, chunk: DCPChunk) -> torch.Tensor:
    where = (
        f"{path} (checkpoint key {tensor.key!r}, chunk at offsets {chunk.offsets}, bytes {chunk.offset}+{chunk.length})"
    )
    try:
        value = torch.load(_Window(file, chunk.offset, chunk.length), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DCPError(f"{where}: not a readable torch.save record ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != chunk.sizes or value.dtype != tensor.dtype:
        got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise DCPError(f"{where}: holds {got}, but {METADATA_NAME} says {chunk.sizes} {tensor.dtype}.")
    return value


def _check_files(folder: Path, selected: Iterable[DCPTensor]) -> None:
    """Every needed file present and long enough, before anything is read."""
    sizes: dict[str, int] = {}
    for tensor in selected:
        for chunk in tensor.chunks:
            if chunk.transforms:
                raise DCPError(
                    f"checkpoint key {tensor.key!r}: its chunk in {folder / chunk.file} is stored through "
                    f"{list(chunk.transforms)} (e.g. compressed), which this reader does not undo. Save without "
                    f"storage extensions, or load it with torch.distributed.checkpoint.load."
                )
            if chunk.file not in sizes:
                path = folder / chunk.file
                if Path(chunk.file).is_absolute() or ".." in Path(chunk.file).parts:
                    raise DCPError(f"{folder / METADATA_NAME}: names the data file {chunk.file!r} outside the folder.")
                sizes[chunk.file] = file_size(path) if path.is_file() else -1
            size = sizes[chunk.file]
            if size < 0:
                raise DCPError(
                    f"{folder / chunk.file}: missing; it holds checkpoint key {tensor.key!r} (chunk at offsets "
                    f"{chunk.offsets}). Copy the whole checkpoint folder, every rank's *.distcp file included."
                )
            if chunk.offset + chunk.length > size:
                raise DCPError(
                    f"{folder / chunk.file}: truncated: it has {size} bytes, but checkpoint key {tensor.key!r} "
                    f"(chunk at offsets {chunk.offsets}) is stored in bytes "
                    f"{chunk.offset}..{chunk.offset + chunk.length}. "
                    f"Copy the file again (or the save did not finish)."
                )


def read_tensors(
    folder: str | os.PathLike,
    keys: Iterable[str],
    *,
    canonical: bool = True,
    tensors: dict[str, DCPTensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The full CPU tensors of `keys`, reading only their chunks' byte ranges.

    With `canonical=True` (default) `keys` are canonical parameter names (see `canonical_keys`) and so are the
    returned keys; with `canonical=False` they are the checkpoint's keys as saved. `tensors`: what `dcp_tensors`
    returned for this folder, if the caller has it (`.metadata` is then not read again). Every file and every
    chunk's coverage is checked before anything is read. Memory: the selected tensors plus one chunk at a time.
    """
    folder = Path(folder)
    tensors = dcp_tensors(folder) if tensors is None else tensors
    if canonical:
        by_name = {name: key for key, name in canonical_keys(tensors).items()}
    else:
        by_name = {key: key for key in tensors}
    wanted = list(dict.fromkeys(keys))
    missing = [k for k in wanted if k not in by_name]
    if missing:
        kind = "parameter names" if canonical else "keys"
        raise DCPError(
            f"{folder}: the checkpoint has no tensor for the {kind} {missing[:5]}"
            f"{' (and more)' if len(missing) > 5 else ''}; it holds {len(by_name)} model tensors, "
            f"e.g. {sorted(by_name)[:3]}."
        )
    selected = {name: tensors[by_name[name]] for name in wanted}
    for tensor in selected.values():
        _check_cover(tensor)
    _check_files(folder, selected.values())

    # read file by file, in offset order; a tensor saved as one chunk is used as loaded (no copy)
    jobs: dict[str, list[tuple[str, DCPChunk]]] = {}
    for name, tensor in selected.items():
        for chunk in tensor.chunks:
            if math.prod(chunk.sizes):
                jobs.setdefault(chunk.file, []).append((name, chunk))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in selected.items():
        if len([c for c in tensor.chunks if math.prod(c.sizes)]) != 1:
            out[name] = torch.empty(tensor.shape, dtype=tensor.dtype)
    for file_name, items in jobs.items():
        path = folder / file_name
        with open_binary(path) as f:
            for name, chunk in sorted(items, key=lambda item: item[1].offset):
                tensor = selected[name]
                value = _load_chunk(f, path, tensor, chunk)
                if name not in out:
                    out[name] = value
                    continue
                box = out[name]
                for dim, (o, s) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                    box = box.narrow(dim, o, s)
                box.copy_(value)
                del value
    return {name: out[name] for name in wanted}
