"""A saved adapter as runs of elements at byte offsets in files, read by range (`AdapterFiles`).

A safetensors file stores each tensor's bytes at an offset its header gives; a shard set
(`shardsave.formats.shard_set`) stores runs of elements whose offsets its headers give. Both are "runs of the
flattened tensor at byte offsets in files", so one reader serves both, and `shardsave.plan.ranges.read_items`
says which runs a range needs: whatever world size and backend saved the adapter, a rank reads only its own
bytes. Each file is opened once per `AdapterFiles` (through `shardsave.storage.reads.open_binary`) and kept open
across reads (`close` ends them): a ZeRO-3 rank reads one range of every tensor, and an open per range was ~570k
opens of one file at 512 ranks. `shardsave.formats.adapter` opens an adapter folder into one,
`shardsave.formats.shard_index` a shard set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from shardsave.errors import AdapterFilesError
from shardsave.plan.ranges import read_items
from shardsave.storage.reads import open_binary
from shardsave.storage.streaming import TensorSpec

__all__ = ["ElementRun", "AdapterFiles"]


@dataclass(frozen=True, slots=True)
class ElementRun:
    """Elements `[start, stop)` of a flattened tensor, stored contiguously in `path`."""

    start: int
    stop: int
    path: Path
    offset: int  # byte offset of element `start` in the file; -1: not known until the file's header is read


#: Called on a file's first open, before a byte of it is used: proves it is the file expected (else raises
#: `AdapterFilesError`) and returns the byte offset of each `(key, start)` run in it.
OpenCheck = Callable[[BinaryIO, Path], dict[tuple[str, int], int]]


@dataclass
class AdapterFiles:
    """One adapter of a saved folder or shard set: its config, its tensors' shapes and dtypes, their runs."""

    path: Path  # what was opened: the adapter folder, or the shard set
    kind: str  # "safetensors" | "bin" | "shards"
    config: dict  # adapter_config.json as saved
    specs: dict[str, TensorSpec]  # checkpoint key -> full shape and dtype, in the file's order
    runs: dict[str, list[ElementRun]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # `.bin`: memory-mapped

    verified: dict = field(default_factory=dict)  # shard sets: each shard file as the verifying rank saw it
    manifest_sha256: str = ""
    check_on_open: OpenCheck | None = None  # opened from another rank's index: each file is checked at first use
    _files: dict[Path, BinaryIO] = field(default_factory=dict, repr=False)
    _offsets: dict[Path, dict[tuple[str, int], int]] = field(default_factory=dict, repr=False)

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
            fd = self._file(run.path).fileno()
            offset = run.offset if run.offset >= 0 else self._offsets[run.path][(key, run.start)]
            got = os.preadv(fd, [view[lo : lo + n]], offset + item.offset * size)
            if got != n:
                raise AdapterFilesError(f"{run.path}: ended before byte {offset + item.offset * size + n}: truncated.")
        return out

    def opened(self) -> list[Path]:
        """The files read so far (each opened once)."""
        return list(self._files)

    def close(self) -> None:
        """Close the files kept open across reads."""
        files, self._files = self._files, {}
        for f in files.values():
            f.close()

    def __enter__(self) -> AdapterFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _file(self, path: Path) -> BinaryIO:
        f = self._files.get(path)
        if f is None:
            try:
                f = open_binary(path)
            except OSError as exc:
                raise AdapterFilesError(f"{path}: cannot be opened ({exc.strerror}).") from None
            self._files[path] = f
            if self.check_on_open is not None:
                try:
                    self._offsets[path] = self.check_on_open(f, path)
                except AdapterFilesError:
                    self._files.pop(path)
                    f.close()
                    raise
        return f
