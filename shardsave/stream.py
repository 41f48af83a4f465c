"""Write a safetensors file one tensor at a time, byte-identical to `safetensors.torch.save_file`.

`save_file` needs every tensor in memory at once; the merge must not (its memory stays around the largest
tensor), so it writes the header from shapes and dtypes alone, then streams each tensor's bytes in the order
safetensors itself lays them out: by dtype, larger kinds first, then by name.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import _TYPES

__all__ = ["TensorSpec", "dtype_name", "dtype_from_name", "write_streaming"]

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
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


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


def _order(specs: Mapping[str, TensorSpec]) -> list[str]:
    unknown = {dtype_name(s.dtype) for s in specs.values()} - set(_RANK)
    if unknown:
        raise ValueError(f"streaming writer does not know the safetensors order of {sorted(unknown)}")
    return sorted(specs, key=lambda k: (-_RANK[dtype_name(specs[k].dtype)], k))


def write_streaming(
    path: Path,
    specs: Mapping[str, TensorSpec],
    produce: Callable[[str], torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Write `path`; `produce(name)` is called once per tensor, in file order, and may free it afterwards."""
    order = _order(specs)
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        spec = specs[name]
        header[name] = {"dtype": dtype_name(spec.dtype), "shape": list(spec.shape),
                        "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            spec = specs[name]
            tensor = produce(name)
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, expected {spec}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).numpy()))
            if on_tensor is not None:
                on_tensor(name)
