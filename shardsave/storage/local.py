"""The local POSIX storage: stage a hidden sibling, commit it atomically, replace files one by one.

Runs on the writing rank only and knows nothing of ranks or sharding. `publish` builds the new directory
as a hidden sibling, fsyncs it, and swaps it into place (one atomic exchange on Linux), so readers see the
old adapter or the new one, never a mix; files in an existing directory that are not part of the adapter
are carried over by hard link, except the previous save's weights that the new ones supersede
(`shardsave.storage.stale.superseded_weights`). Modes are those PEFT's own save gives: new directories and
files get the process umask's defaults (the kernel applies it), and whatever the new adapter replaces keeps its
mode, as a file overwritten in place would. Hidden siblings carry their writer's owner tag
(`shardsave.storage.owner`), so that what a writer that provably died left behind is removed later
(`shardsave.storage.stale.remove_stale`). `LocalStorage` bundles this module's functions and those of `files`,
`reads` and `stale` as the implementation of `shardsave.storage.base.Storage`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from shardsave.plan.names import BIN_NAME, SAFETENSORS_NAME
from shardsave.storage import files, reads, stale
from shardsave.storage.filesystems import filesystem_type, parallel_safe
from shardsave.storage.posix import cwd_inside, fsync, fsync_tree, keep_mode, link_or_copy, new_file, rename_exchange
from shardsave.storage.stale import (
    MODEL_WEIGHTS,
    OLD_MARK,
    TMP_MARK,
    create_hidden,
    hidden_name,
    is_model_folder,
    remove_stale,
    remove_stale_in,
    superseded_weights,
)

__all__ = [
    "publish",
    "stage_directory",
    "discard",
    "atomic_file",
    "replace_adapter_files",
    "check_destination",
    "check_path_argument",
    "check_overwrite",
    "parallel_writes",
    "LocalStorage",
]


def check_path_argument(save_directory: str | os.PathLike) -> str:
    """The path as given (not resolved: the writer resolves it on its own node), or `ValueError`."""
    if not isinstance(save_directory, (str, os.PathLike)) or not os.fspath(save_directory):
        raise ValueError(f"save_directory must be a non-empty path, got {save_directory!r}.")
    return os.fsdecode(os.fspath(save_directory))


def check_destination(save_directory: str | os.PathLike) -> Path:
    """The absolute destination, or `ValueError` if it cannot hold an adapter directory."""
    check_path_argument(save_directory)
    dest = Path(os.path.abspath(os.fspath(save_directory)))
    if dest.is_symlink():
        dest = dest.resolve()
    if dest.exists() and not dest.is_dir():
        raise ValueError(
            f"Provided path ({save_directory}) should be a directory, not a file: shardsave writes an adapter "
            f"directory there. Remove the file or choose another save_directory."
        )
    return dest


def check_overwrite(destination: Path, overwrite: bool, error: type[Exception], *, replaced: str = "it.") -> None:
    """`error` if `destination` exists and `overwrite` is not set: the refusal every offline writer (stitch,
    merge, rescue) gives, the same words each time; `replaced` says what an overwrite would replace."""
    if destination.exists() and not overwrite:
        raise error(f"{destination}: already exists; pass overwrite=True (--overwrite) to replace {replaced}")


def parallel_writes(location: str | os.PathLike) -> bool:
    """Whether several ranks may write ranges of one file at `location` at once (`filesystems.PARALLEL_SAFE`)."""
    return parallel_safe(filesystem_type(location))


def _carry_over(old: Path, new: Path) -> None:
    """Bring into `new` what `old` holds and the new adapter does not replace; what it replaces keeps its mode."""
    entries = list(os.scandir(old))
    superseded = set(superseded_weights(new, [e.name for e in entries if not e.is_dir(follow_symlinks=False)]))
    for entry in entries:
        target = new / entry.name
        if entry.is_dir(follow_symlinks=False):
            if target.is_dir() and not target.is_symlink():
                _carry_over(Path(entry.path), target)
                keep_mode(entry.path, target)  # after filling it: the kept mode may lack write permission
            elif not os.path.lexists(target):
                shutil.copytree(entry.path, target, symlinks=True, copy_function=link_or_copy)
        elif os.path.lexists(target):
            keep_mode(entry.path, target)  # replaced
        elif entry.name in superseded:
            continue  # the previous save's weights: they would load instead of the new ones
        else:
            link_or_copy(entry.path, str(target))


def _swap_in(tmp: Path, dest: Path, later: Callable[[Callable[[], None]], None]) -> None:
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    if rename_exchange(tmp, dest):  # `dest` is never missing; `tmp` now holds the previous adapter
        later(lambda: shutil.rmtree(tmp, ignore_errors=True))
        return
    # two renames: a writer killed between them leaves no `dest` and the previous adapter in `old`
    old = hidden_name(dest.parent, f".{dest.name}{OLD_MARK}")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a new hidden, owner-tagged sibling of `path`, fsync it and rename it over `path`, then
    fsync the directory; on any failure the sibling is removed. The file gets the mode a plain `open` would
    give it (the umask's default for a new file; an existing file's mode is kept)."""
    tmp = create_hidden(path.parent, f".{path.name}.", new_file)
    try:
        write(tmp)
        keep_mode(path, tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def _replace_in_place(tmp: Path, dest: Path) -> None:
    """Fallback when `dest` itself cannot be renamed (a mount point, or the working directory): each file
    is replaced atomically, weights last, so a crash leaves at worst a new config beside old weights."""
    written = [Path(d) / f for d, _, fs in os.walk(tmp) for f in fs]
    written.sort(key=lambda p: p.name in (SAFETENSORS_NAME, BIN_NAME) or bool(MODEL_WEIGHTS.fullmatch(p.name)))
    model_folder = is_model_folder(tmp)
    superseded = superseded_weights(tmp, os.listdir(dest)) if model_folder else []
    for src in written:
        target = dest / src.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, target)
    for name in superseded:  # after the new weights are in place: a crash in between leaves both, never neither
        if not (dest / name).is_dir():
            (dest / name).unlink(missing_ok=True)
    stale_of = {SAFETENSORS_NAME: BIN_NAME, BIN_NAME: SAFETENSORS_NAME}
    for src in written:
        if src.name in stale_of:
            (dest / src.relative_to(tmp)).with_name(stale_of[src.name]).unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _now(task: Callable[[], None]) -> None:
    task()


def stage_directory(save_directory: str | os.PathLike) -> Path:
    """A new hidden sibling of `save_directory`, owner-tagged, to fill ahead of time (from another thread)
    and hand to `publish(..., staged=)`; `discard` it if the save is abandoned."""
    dest = check_destination(save_directory)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # not mkdtemp (mode 0700): the adapter's directory gets the mode PEFT's os.makedirs gives it
    return create_hidden(dest.parent, f".{dest.name}{TMP_MARK}", lambda path: os.mkdir(path, 0o777))


def discard(staged: Path) -> None:
    """Remove a staged directory that will not be published."""
    shutil.rmtree(staged, ignore_errors=True)


def publish(
    save_directory: str | os.PathLike,
    fill: Callable[[Path], None],
    *,
    later: Callable[[Callable[[], None]], None] = _now,
    staged: Path | None = None,
) -> Path:
    """Create or replace the adapter directory `save_directory` with what `fill(tmp)` writes into `tmp`.

    `fill` gets a hidden sibling directory: a new, empty one, or `staged` (from `stage_directory`, possibly
    holding files written ahead). On any error the sibling is removed and the destination is untouched.
    Removing the previous adapter once the new one is in place is handed to `later` (at once by default): a
    caller that others wait for can do it after telling them it is done.
    """
    dest = check_destination(save_directory)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    tmp = staged if staged is not None else stage_directory(dest)
    try:
        fill(tmp)
        if dest.is_dir():
            _carry_over(dest, tmp)
            keep_mode(dest, tmp)
        fsync_tree(tmp)
        if dest.is_dir() and cwd_inside(dest):
            _replace_in_place(tmp, dest)
        else:
            try:
                _swap_in(tmp, dest, later)
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM):
                    raise
                _replace_in_place(tmp, dest)
        fsync(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def replace_adapter_files(directory: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Replace, inside the existing directory `directory`, the files that `fill(tmp)` writes into `tmp`, each
    atomically; nothing else in `directory` is linked, copied, fsynced or otherwise touched.

    For directories that hold much more than the adapter (a Trainer checkpoint's optimizer and DeepSpeed
    shards), which `publish` would carry over whole. `fill` gets an empty hidden directory inside `directory`
    (same filesystem). Its files are fsynced, then renamed over their namesakes, weights last; a weights file of
    the other format beside a new one is removed. An error in `fill` leaves `directory` as it was. A reader
    sees each file old or new, never torn, but may see the new config beside the old weights for a moment:
    use `publish` where the adapter must change as a whole.
    """
    dest = check_destination(directory)
    if not dest.is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            f"Cannot replace the adapter files in {dest}: it is not an existing directory. Create it first, or "
            f"publish a new adapter directory there instead",
            str(dest),
        )
    remove_stale_in(dest, re.compile(re.escape(TMP_MARK)))
    tmp = create_hidden(dest, TMP_MARK, lambda path: os.mkdir(path, 0o777))
    try:
        fill(tmp)
        written = [Path(d) / f for d, _, fs in os.walk(tmp) for f in fs]
        for path in written:
            fsync(path)
        folders = {dest} | {dest / path.parent.relative_to(tmp) for path in written}
        _replace_in_place(tmp, dest)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # the renames, made durable
            fsync(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


class LocalStorage:
    """`shardsave.storage.base.Storage` on a local (or POSIX network) filesystem: the functions of this module
    and of `files`, `reads` and `stale`, unchanged. The layers above call those functions; this object is what
    an implementation for another kind of storage is checked against (`tests/storage/test_protocol.py`)."""

    check_destination = staticmethod(check_destination)
    stage_directory = staticmethod(stage_directory)
    discard = staticmethod(discard)
    write_files = staticmethod(files.write_files)
    write_text = staticmethod(files.write_text)
    write_bytes = staticmethod(files.write_bytes)
    make_dirs = staticmethod(files.make_dirs)
    remove_file = staticmethod(files.remove_file)
    preallocate = staticmethod(files.preallocate)
    range_writer = staticmethod(files.RangeWriter)
    parallel_writes = staticmethod(parallel_writes)
    open_binary = staticmethod(reads.open_binary)
    read_range = staticmethod(reads.read_range)
    read_bytes = staticmethod(reads.read_bytes)
    read_text = staticmethod(reads.read_text)
    file_size = staticmethod(reads.file_size)
    publish = staticmethod(publish)
    atomic_file = staticmethod(atomic_file)
    replace_adapter_files = staticmethod(replace_adapter_files)
    remove_stale = staticmethod(stale.remove_stale)
    remove_stale_in = staticmethod(stale.remove_stale_in)
