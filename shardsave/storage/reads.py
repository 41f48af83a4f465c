"""Reading checkpoint files: the read side of the storage seam (`shardsave.storage.base.Storage`), so that no module
above `shardsave.storage` opens a checkpoint path itself (an object store plugs in here next: a ranged GET for
`read_range`, a HEAD for `file_size`).

Local POSIX files today. Every reader of a format (`shardsave.formats`) reads through these functions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

__all__ = ["open_binary", "read_range", "read_text", "read_bytes", "file_size"]


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """A seekable binary reader of `path` (for `torch.load`, safetensors headers, memory maps); the caller closes it."""
    return open(path, "rb")


def read_range(path: str | os.PathLike, offset: int, length: int) -> bytes:
    """`length` bytes of `path` from `offset` (fewer only at the end of the file)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole of a small file (configs, manifests, indexes)."""
    return Path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    """The whole of a small text file, as UTF-8."""
    return Path(path).read_text(encoding="utf-8")


def file_size(path: str | os.PathLike) -> int:
    """The size of `path` in bytes."""
    return os.stat(path).st_size
