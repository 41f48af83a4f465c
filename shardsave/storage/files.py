"""Writing into a staged directory: whole files, files sized ahead with a header, and byte ranges at offsets.

What the layers above write themselves (texts, markers, a merged model's index, each rank's ranges of a file
written in parallel) goes through here rather than through `open`, `os.pwrite` or `os.fsync`, so that the
storage decides how bytes land. Serializers that take a path (safetensors, `torch.save`, `save_pretrained`)
write into the staged directory directly: a stage is a local directory on every implementation (see `base`).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from shardsave.storage.posix import fsync, new_file

__all__ = [
    "write_files",
    "write_text",
    "write_bytes",
    "with_open_mode",
    "make_dirs",
    "remove_file",
    "preallocate",
    "RangeWriter",
    "scratch_directory",
    "remove_scratch",
]


def write_files(directory: Path, files: Mapping[str, bytes]) -> None:
    """`files` (relative path -> bytes) into `directory`, each fsynced (modes from the umask, as `open`)."""
    for relative, data in files.items():
        path = directory / relative
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        fsync(path)


def write_text(path: Path, text: str) -> None:
    """`text` as the whole of `path` (as `Path.write_text`: the locale's encoding, no fsync: the publish syncs)."""
    path.write_text(text)


def write_bytes(path: Path, data: bytes) -> None:
    """`data` as the whole of `path` (no fsync: the publish syncs)."""
    path.write_bytes(data)


def with_open_mode(path: Path, write: Callable[[], None]) -> None:
    """Run `write()`, then give `path` the mode a plain `open(path, "wb")` would have given it: the existing
    file's, or the umask's default for a new one. safetensors >= 0.8 renames a mode-0600 temporary file into
    place (safetensors#782), which would make the weights unreadable to the group whatever the umask says."""
    try:
        new_file(path)  # the kernel applies the umask (and a default ACL) to it: no process-wide umask() call
    except FileExistsError:
        pass
    mode = stat.S_IMODE(os.stat(path).st_mode)
    write()
    if stat.S_IMODE(os.stat(path).st_mode) != mode:
        os.chmod(path, mode)


def make_dirs(path: Path, *, parents: bool = False) -> None:
    """The directory `path` (and with `parents` its missing parents); nothing if it exists."""
    path.mkdir(parents=parents, exist_ok=True)


def remove_file(path: Path, *, missing_ok: bool = True) -> None:
    """Remove the file `path` (`FileNotFoundError` if it is missing, unless `missing_ok`)."""
    path.unlink(missing_ok=missing_ok)


def preallocate(path: Path, head: bytes, size: int) -> None:
    """A new file of `size` bytes that starts with `head`; the rest is a hole for ranges written later."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


class RangeWriter:
    """Writes byte ranges into existing files of `directory` at given offsets (`pwrite`), each file opened on its
    first write: how each rank writes its own ranges of the files a parallel merged save preallocated. `sync()`
    fsyncs every file written to; `close()` closes them (always call it, e.g. in `finally`)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._fds: dict[str, int] = {}

    def write(self, filename: str, data: memoryview, at: int) -> None:
        """All of `data` into `directory/filename` from byte `at`."""
        fd = self._fds.get(filename)
        if fd is None:
            fd = self._fds[filename] = os.open(self._directory / filename, os.O_WRONLY)
        while data.nbytes:
            written = os.pwrite(fd, data, at)
            data, at = data[written:], at + written

    def sync(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


def scratch_directory(prefix: str, near: Path | None = None) -> Path:
    """A new private (mode 0700) directory for intermediate files, in `near` if that is a directory (the same
    filesystem as the output), else in the system's temporary directory; `remove_scratch` it when done."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=near if near is not None and near.is_dir() else None))


def remove_scratch(path: Path) -> None:
    """Remove a scratch directory and everything in it."""
    shutil.rmtree(path, ignore_errors=True)
