"""Who wrote a hidden file, and whether that process is provably gone, so that only its leftovers are removed.

An owner tag `<pid>-<start>-<space>-` names one process without ambiguity: `start` is its start time (clock
ticks after boot, field 22 of `/proc/<pid>/stat`), which tells a reused pid apart, and `space` hashes what
gives the pid and the start time their meaning: the host name, the boot id, and the inodes of the pid and
time namespaces. A process proves another one gone only from the same space, and only when the kernel says
so: no process with that pid, or a zombie, or one that started at another time. From another host, container
(pid namespace), boot, or without a readable `/proc` nothing is proved and the file is kept; a writer that is
merely slow is alive and so never loses its files.

Liveness is read from `/proc`, not from a lock the writer would hold: on NFS and Lustre a lock is only as
good as the mount (`nolock`, `local_lock=flock`, Lustre's `localflock`), and a lock that another node can take
while its holder runs would prove a live writer dead. The price: what a writer left on a shared filesystem is
removed only by a later process in the same host, boot and container. Names in the format of earlier versions
(`<pid>-<host hash>-`, which cannot tell containers apart) do not parse, so they are left alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass

__all__ = ["UNKNOWN_SPACE", "Owner", "owner_tag", "space_key", "space_parts"]

#: The `space` of a process that could not read its own identity: never equal to a real one's.
UNKNOWN_SPACE = "0" * 12
_TAG = re.compile(r"([1-9]\d{0,9})-(\d{1,20})-([0-9a-f]{12})-")


def _proc_stat(pid: int | str) -> tuple[int, str, int] | None:
    """(pid, state, start time) from `/proc/<pid>/stat`; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
        head, _, tail = text.rpartition(b")")  # the command name may hold spaces and parentheses
        fields = tail.split()
        return int(head.split(b" (", 1)[0]), fields[0].decode(), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _namespace(kind: str) -> str | None:
    """`<dev>:<inode>` of this process's namespace `kind`; "-" where the kernel has no such namespace."""
    try:
        st = os.stat(f"/proc/self/ns/{kind}")
    except FileNotFoundError:
        return "-" if os.path.isdir("/proc/self/ns") else None
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def space_key(parts: tuple[str, ...]) -> str:
    """The `space` of a tag: a short hash of host name, boot id, pid namespace and time namespace."""
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:12]


def space_parts() -> tuple[str, ...] | None:
    """What gives this process's pid and start time their meaning; None if any of it is unreadable."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    pid_ns, time_ns = _namespace("pid"), _namespace("time")
    if not boot or pid_ns is None or time_ns is None:
        return None
    return socket.gethostname(), boot, pid_ns, time_ns


@dataclass(frozen=True, slots=True)
class Owner:
    """A process, as named in the hidden files it writes."""

    pid: int
    start: int
    """Start time in clock ticks after boot (0 where unknown)."""
    space: str
    """Hash of host, boot and namespaces, in which `pid` and `start` mean something (`UNKNOWN_SPACE`)."""

    @classmethod
    def current(cls) -> Owner:
        """This process (read once per process: /proc/self/stat costs milliseconds in a large process)."""
        cached = _CURRENT.get(os.getpid())
        if cached is None:
            _CURRENT.clear()
            cached = _CURRENT[os.getpid()] = cls._read_current()
        return cached

    @classmethod
    def _read_current(cls) -> Owner:
        pid, parts, own = os.getpid(), space_parts(), _proc_stat("self")
        # a /proc mounted for another pid namespace shows another pid for "self": it proves nothing here
        if parts is None or own is None or own[0] != pid:
            return cls(pid, 0, UNKNOWN_SPACE)
        return cls(pid, own[2], space_key(parts))

    @property
    def tag(self) -> str:
        return f"{self.pid}-{self.start}-{self.space}-"

    @classmethod
    def parse(cls, text: str, pos: int = 0) -> tuple[Owner, int] | None:
        """The owner whose tag starts at `text[pos:]`, and where the tag ends; None if there is none."""
        match = _TAG.match(text, pos)
        if match is None:
            return None
        return cls(int(match.group(1)), int(match.group(2)), match.group(3)), match.end()

    def gone(self) -> bool:
        """True only if this process provably no longer runs: see the module's docstring."""
        here = Owner.current()
        if here.space == UNKNOWN_SPACE or self.space != here.space:
            return False
        if not _exists(self.pid):
            return True
        stat = _proc_stat(self.pid)
        if stat is None:  # it ended just now, or /proc hides it (hidepid): only the kernel's "no such" counts
            return not _exists(self.pid)
        _, state, start = stat
        return state in ("Z", "X") or start != self.start


_CURRENT: dict[int, Owner] = {}  # by pid: a forked child reads its own


def _exists(pid: int) -> bool:
    """Whether a process (or zombie) with `pid` exists in this pid namespace; True where that is unclear."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists, as another user
        return True
    return True


def owner_tag() -> str:
    """This process's tag; it starts the name of everything it writes before publishing it."""
    return Owner.current().tag
