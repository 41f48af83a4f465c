"""The storage seam: what shardsave asks of the place a checkpoint lives, as one declared `Storage` protocol.

Everything above `shardsave.storage` reaches bytes at a location through these operations (today as the
functions of `local`, `files`, `reads` and `stale`, which `local.LocalStorage` bundles), never through `open`,
`os.rename`, `os.fsync` or `os.pwrite` itself. The call order, and which rank makes each call:

1. Every rank: `check_destination(location)` (the path as given; it is resolved where it is written). The
   writer (rank 0, or the rank `is_main_process` names) alone runs steps 2, 4 and 5 for a folder it publishes.
2. Writer: `stage_directory(location)`: an empty hidden staging directory beside the destination, possibly from
   a background thread while the ranks agree (`formats.texts.render_in_background`).
3. Writer (and, in a parallel merged save, every rank): fill the stage. Serializers write whole files into it
   by path (safetensors, `torch.save`, `save_pretrained`); what shardsave renders itself goes through
   `write_files` / `write_text` / `write_bytes` / `make_dirs`. A parallel merged save: the writer
   `preallocate`s each safetensors file (header and full size), asks `parallel_writes(location)`, and every
   rank writes its own ranges with `range_writer(stage)` (`write`, `sync`, `close`), then reads them back with
   `read_range` / `file_size` before the writer commits.
4. Writer: `publish(location, fill, staged=stage)`: commit. Readers see the previous folder or the new one,
   never a mix; files of the previous folder that the new one does not replace are kept, except those it
   supersedes (`stale.superseded_weights`); removing the previous copy may be deferred (`later`) until the
   waiting ranks are released. `discard(stage)` instead when the save is abandoned.
5. Writer, before staging: `remove_stale(location)` removes what a writer that provably died left beside it
   (`publish` calls it). Other ranks never remove anything.

Two further commits: `atomic_file(path, write)` replaces one file as a whole: each rank's shard file
(`save.shards`, every rank its own), then the manifest that vouches for the set, written last by rank 0 (the
marker that says "complete" lands last); `remove_stale_in(directory, prefix)` removes part-written files of
ranks that provably died. `replace_adapter_files(directory, fill)` replaces only the adapter's files inside a
larger folder (a Trainer `checkpoint-N/`, by the Trainer's writer), each atomically, weights last. Readers of
every format read through `open_binary`, `read_range`, `read_bytes`, `read_text` and `file_size`.

What a non-POSIX implementation (an object store, issue #27) must provide, and may do differently:

- A stage is always a local directory (a scratch folder that `publish` uploads), because the serializers
  write paths; `stage_directory` and `publish(fill)` keep their signatures, `discard` deletes the scratch.
- There is no rename: `publish` uploads one object per file (a PUT; multipart for large ones) and must write
  first what the loaders read last and last what they read first: the weights, then `adapter_config.json`
  (or the model's index and `config.json`); then delete the superseded objects of the previous save.
  `atomic_file` is a single PUT (objects are replaced whole); `replace_adapter_files` the same per file.
  A reader may see the new config over old weights for a moment where the store offers no versioned prefix:
  say so, as `replace_adapter_files` does.
- `parallel_writes` answers False unless ranged writes of several ranks into one object really land (parts of
  a multipart upload can: `range_writer` then maps ranges to parts); the merged save then streams the tensors
  to the writer, which it already does on FUSE and NFS mounts.
- `read_range` is a ranged GET, `file_size` a HEAD; `open_binary` returns a seekable reader.
- `remove_stale` / `remove_stale_in` remove only what is provably stale: an object store cannot prove a
  writer on another host dead (`owner.Owner.gone`), so it keeps everything and leaves the staging prefix to
  a lifecycle rule. `check_destination` refuses what cannot hold a folder there (an object at the prefix).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

__all__ = ["Storage", "RangeWrites"]


class RangeWrites(Protocol):
    """Byte ranges of a rank into existing files of a staged directory (`files.RangeWriter`)."""

    def write(self, filename: str, data: memoryview, at: int) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class Storage(Protocol):
    """Bytes at a location: stage, write files or ranges, read ranges, commit atomically, remove what is
    provably stale. The call order and each step's rank are in this module's docstring."""

    # where: the destination, checked
    def check_destination(self, save_directory: str | os.PathLike) -> Path: ...

    # stage
    def stage_directory(self, save_directory: str | os.PathLike) -> Path: ...
    def discard(self, staged: Path) -> None: ...

    # write files or byte ranges into a stage
    def write_files(self, directory: Path, files: Mapping[str, bytes]) -> None: ...
    def write_text(self, path: Path, text: str) -> None: ...
    def write_bytes(self, path: Path, data: bytes) -> None: ...
    def make_dirs(self, path: Path, *, parents: bool = False) -> None: ...
    def remove_file(self, path: Path, *, missing_ok: bool = True) -> None: ...
    def preallocate(self, path: Path, head: bytes, size: int) -> None: ...
    def range_writer(self, directory: Path) -> RangeWrites: ...
    def parallel_writes(self, location: str | os.PathLike) -> bool: ...

    # read byte ranges
    def open_binary(self, path: str | os.PathLike) -> BinaryIO: ...
    def read_range(self, path: str | os.PathLike, offset: int, length: int) -> bytes: ...
    def read_bytes(self, path: str | os.PathLike) -> bytes: ...
    def read_text(self, path: str | os.PathLike) -> str: ...
    def file_size(self, path: str | os.PathLike) -> int: ...

    # commit atomically
    def publish(
        self,
        save_directory: str | os.PathLike,
        fill: Callable[[Path], None],
        *,
        later: Callable[[Callable[[], None]], None] = ...,
        staged: Path | None = None,
    ) -> Path: ...
    def atomic_file(self, path: Path, write: Callable[[Path], None]) -> None: ...
    def replace_adapter_files(self, directory: str | os.PathLike, fill: Callable[[Path], None]) -> Path: ...

    # remove what is provably stale
    def remove_stale(self, dest: Path) -> list[str]: ...
    def remove_stale_in(self, directory: Path, prefix: re.Pattern) -> list[str]: ...
