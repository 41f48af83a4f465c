"""Which filesystem holds a path, and whether several processes may write one file there at once.

`save_merged` lets every rank `pwrite` its runs into one file only where the filesystem keeps concurrent writes
at distinct offsets. Object-store mounts do not (gcsfuse, s3fs-fuse, blobfuse upload the whole object from each
writer's local copy on close: the last writer wins, the other ranks' ranges are zeros), and a file every rank can
read proves nothing about that. So the type decides, read from `/proc/self/mountinfo` (Python's `os.statvfs`
has no filesystem type): the mount with the longest mount point that contains the path, the last one mounted
where several share it. Only types known to keep such writes are trusted (`PARALLEL_SAFE`); FUSE, NFS, SMB and
every type not listed are not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PARALLEL_SAFE", "parse_mountinfo", "mount_type", "filesystem_type", "parallel_safe"]

#: Filesystem types on which writes by several processes (or nodes) at distinct offsets of one file all land:
#: local disk filesystems and memory (one node: one page cache), an overlay (a container's root: its upper layer
#: is a local filesystem), and the parallel filesystems built for many clients writing one file (MPI-IO N-to-1).
#: Not listed, so streamed to the writer unless `parallel_write=True`: `fuse.*` / `fuseblk` (gcsfuse, s3fs,
#: blobfuse2, goofys, JuiceFS ...), `nfs` / `nfs4` (close-to-open caching: nfs(5) asks clients that write one
#: file together to lock it, and NFS gateways to object stores keep the last writer), `cifs` / `smb3`, `9p`,
#: `virtiofs`, and anything else.
_LOCAL = ("ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "bcachefs", "tmpfs", "ramfs", "overlay")
_PARALLEL = ("lustre", "gpfs", "beegfs", "ceph", "wekafs")
PARALLEL_SAFE = frozenset(_LOCAL + _PARALLEL)

_MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    r"""A mountinfo path field: the kernel writes space, tab, newline and backslash as octal (`\040` ...)."""
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1 : i + 4]
        if field[i] == "\\" and len(digits) == 3 and all(c in "01234567" for c in digits):
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """`(mount point, filesystem type)` of every line of a `/proc/<pid>/mountinfo` text, in mount order. A line
    is `id parent major:minor root mount-point options [optional fields...] - type source super-options`; lines
    that do not have that form are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        if dash + 1 >= len(fields):
            continue
        mounts.append((_unescape(fields[4]), fields[dash + 1]))
    return mounts


def _contains(mount_point: str, path: str) -> bool:
    if mount_point == "/":
        return True
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def mount_type(path: str, mounts: Sequence[tuple[str, str]]) -> str | None:
    """The filesystem type `path` (absolute, symlinks resolved) is on: the mount with the longest mount point
    that contains it, the last mounted among equals (a later mount hides an earlier one). None: none does."""
    best, found = -1, None
    for mount_point, fstype in mounts:
        if _contains(mount_point, path) and len(mount_point) >= best:
            best, found = len(mount_point), fstype
    return found


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists: where a directory created at `path` would live."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def filesystem_type(path: str | os.PathLike) -> str | None:
    """The type of the filesystem holding `path` (or, if it does not exist yet, where it would be created), from
    `/proc/self/mountinfo`; None where that cannot be read (not Linux)."""
    try:
        text = _MOUNTINFO.read_text()
    except OSError:
        return None
    return mount_type(os.path.realpath(_existing(Path(path))), parse_mountinfo(text))


def parallel_safe(fstype: str | None) -> bool:
    """Whether ranks may write one file at distinct offsets at once on a filesystem of type `fstype`."""
    return fstype in PARALLEL_SAFE
