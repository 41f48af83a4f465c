"""Write a safetensors file one tensor at a time, byte-identical to `safetensors.torch.save_file`.

`save_file` needs every tensor in memory at once; the merge must not (its memory stays around the largest
tensor), so it writes the header from shapes and dtypes alone, then streams each tensor's bytes in the order
safetensors itself lays them out: by dtype, larger kinds first, then by name. A tensor's bytes may also come
as ranges of other files, which the kernel copies without passing them through Python (the merge's case),
and the bytes written may be hashed on the way (the shard writer's checksum, without reading the file back).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import _TYPES

__all__ = [
    "TensorSpec",
    "FileRange",
    "dtype_name",
    "dtype_from_name",
    "file_order",
    "file_layout",
    "write_streaming",
    "read_header",
]

_NAME_OF = {dtype: name for name, dtype in _TYPES.items()}

# safetensors orders data by its Dtype enum, descending (checked against save_file in the tests)
_RANK = {
    name: i
    for i, name in enumerate(
        [
            "BOOL",
            "U8",
            "I8",
            "F8_E5M2",
            "F8_E4M3",
            "I16",
            "U16",
            "F16",
            "BF16",
            "I32",
            "U32",
            "F32",
            "C64",
            "F64",
            "I64",
            "U64",
        ]  # fmt: skip
    )
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class FileRange:
    """`nbytes` bytes at `offset` in the file `path`."""

    path: Path
    offset: int
    nbytes: int


def _copy_range(src: int, dst: int, offset: int, nbytes: int, digest) -> None:
    """Append `nbytes` of `src` at `offset` to `dst`: in the kernel (`copy_file_range`) unless hashing."""
    use_kernel = digest is None and hasattr(os, "copy_file_range")
    while nbytes > 0:
        if use_kernel:
            try:
                done = os.copy_file_range(src, dst, nbytes, offset)
            except OSError:  # another filesystem, an old kernel: copy through user space
                use_kernel = False
                continue
        else:
            chunk = os.pread(src, min(nbytes, 1 << 24), offset)
            if digest is not None:
                digest.update(chunk)
            done = os.write(dst, chunk)
        if done <= 0:
            raise OSError(f"short copy: {nbytes} bytes left at offset {offset}")
        offset += done
        nbytes -= done


class _Sources:
    """Read descriptors of the files that ranges come from, at most `limit` open at once (the least recently
    used is closed first): a merge reads from one file per rank, and a thousand ranks would exceed the usual
    per-process limit of 1024 descriptors (EMFILE)."""

    def __init__(self, limit: int = 32):
        self._limit = limit
        self._open: OrderedDict[Path, int] = OrderedDict()

    def fd(self, path: Path) -> int:
        fd = self._open.pop(path, None)
        if fd is None:
            if len(self._open) >= self._limit:
                os.close(self._open.popitem(last=False)[1])
            fd = os.open(path, os.O_RDONLY)
        self._open[path] = fd
        return fd

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _TYPES[name]
    except KeyError:
        raise ValueError(f"unknown safetensors dtype {name!r}") from None


def file_layout(specs: Mapping[str, TensorSpec], *, metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict]:
    """The file's first bytes (length and JSON header, as `save_file` writes them) and the absolute byte offset of
    each tensor's data: a pure function of shapes and dtypes, so ranks can write their parts of one file apart."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets, offset = {}, 0
    for name in _order(specs):
        spec = specs[name]
        header[name] = {"dtype": dtype_name(spec.dtype), "shape": list(spec.shape),
                        "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offsets[name] = offset
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    return head, {name: len(head) + at for name, at in offsets.items()}


def file_order(specs: Mapping[str, TensorSpec]) -> list[str]:
    """The order `write_streaming` asks for the tensors of `specs` in (safetensors' layout order): callers that
    produce them with collectives follow it on every rank."""
    return _order(specs)


def _order(specs: Mapping[str, TensorSpec]) -> list[str]:
    unknown = {dtype_name(s.dtype) for s in specs.values()} - set(_RANK)
    if unknown:
        raise ValueError(f"streaming writer does not know the safetensors order of {sorted(unknown)}")
    return sorted(specs, key=lambda k: (-_RANK[dtype_name(specs[k].dtype)], k))


def write_streaming(
    path: Path,
    specs: Mapping[str, TensorSpec],
    produce: Callable[[str], torch.Tensor | Sequence[FileRange]],
    *,
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    digest=None,
) -> None:
    """Write `path`; `produce(name)` is called once per tensor, in file order, and returns the tensor or the
    file ranges that hold its bytes in order. `digest` (a `hashlib` object) is updated with every byte."""
    order = _order(specs)
    head, _ = file_layout(specs, metadata=metadata)
    sources = _Sources()
    with open(path, "wb", buffering=0) as f:
        try:
            _write(f, head, digest)
            for name in order:
                spec = specs[name]
                produced = produce(name)
                if torch.is_tensor(produced):
                    if tuple(produced.shape) != spec.shape or produced.dtype != spec.dtype:
                        raise ValueError(f"{name}: produced {tuple(produced.shape)} {produced.dtype}, expected {spec}")
                    data = produced.detach().to("cpu").contiguous().reshape(-1)
                    if data.numel():
                        _write(f, memoryview(data.view(torch.uint8).numpy()), digest)
                else:
                    if sum(r.nbytes for r in produced) != spec.nbytes:
                        raise ValueError(f"{name}: {sum(r.nbytes for r in produced)} bytes given, expected {spec}")
                    for r in produced:
                        _copy_range(sources.fd(r.path), f.fileno(), r.offset, r.nbytes, digest)
                if on_tensor is not None:
                    on_tensor(name)
        finally:
            sources.close()


def _write(f, data, digest) -> None:
    if digest is not None:
        digest.update(data)
    view = memoryview(data).cast("B")
    while view.nbytes:
        view = view[f.write(view) :]


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, int, int, tuple[int, ...]]]]:
    """The file's metadata, and each tensor's `(dtype, absolute offset, nbytes, shape)` (safetensors validates the
    header's offsets when it opens the file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except Exception as exc:
        raise ValueError(f"{path}: unreadable safetensors header ({exc}); the file is corrupt.") from None
    header.pop("__metadata__", None)
    start = 8 + size
    return meta, {
        name: (
            t["dtype"],
            start + t["data_offsets"][0],
            t["data_offsets"][1] - t["data_offsets"][0],
            tuple(int(n) for n in t["shape"]),
        )
        for name, t in header.items()
    }
