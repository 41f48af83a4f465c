"""The POSIX calls the local storage is built of: fsync, new files, modes, links, and Linux's `renameat2`.

Small wrappers with the exact flags the local implementation relies on, so that `local`, `stale` and `files`
share one spelling of each (and tests can count or refuse them in one place).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import sys
from pathlib import Path

__all__ = [
    "fsync",
    "fsync_tree",
    "new_file",
    "keep_mode",
    "link_or_copy",
    "rename_exchange",
    "rename_noreplace",
    "cwd_inside",
]


def fsync(path: Path | str) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file (symlinks aside) and every directory under `root`, each directory after its files."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fsync(path)
        fsync(dirpath)


def new_file(path: Path) -> None:
    """Create the empty file `path` (`FileExistsError` if it exists); the kernel applies the umask to its mode."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))


def keep_mode(old: str | os.PathLike, new: str | os.PathLike) -> None:
    """Give `new` the permission bits of `old` that it replaces, where both are files or both directories."""
    try:
        before, after = os.lstat(old), os.lstat(new)
    except FileNotFoundError:
        return
    same_kind = stat.S_IFMT(before.st_mode) == stat.S_IFMT(after.st_mode)
    if same_kind and not stat.S_ISLNK(before.st_mode) and stat.S_IMODE(before.st_mode) != stat.S_IMODE(after.st_mode):
        os.chmod(new, stat.S_IMODE(before.st_mode))


def link_or_copy(src: str, dst: str) -> None:
    """A hard link of `src` at `dst`, or a copy where the filesystem refuses links."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def cwd_inside(path: Path) -> bool:
    """The working directory is `path` or below it (then `path` cannot be renamed away)."""
    try:
        cwd = Path(os.getcwd())
    except OSError:
        return False
    return cwd == path or path in cwd.parents


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux `renameat2(a, b, flags)`; False where the system or the filesystem does not support `flags`."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def rename_exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (`RENAME_EXCHANGE`); False where that is not supported."""
    return _renameat2(a, b, 2)


def rename_noreplace(a: Path, b: Path) -> None:
    """Rename `a` to `b` unless `b` exists (`FileExistsError`); atomic where `RENAME_NOREPLACE` is supported."""
    if _renameat2(a, b, 1):
        return
    if os.path.lexists(b):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(b))
    os.rename(a, b)
