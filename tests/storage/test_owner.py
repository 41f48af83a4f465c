"""Owner tags: a process is declared gone only when this host, boot and pid namespace prove it; else kept."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardsave.storage import owner, stale
from shardsave.storage.owner import UNKNOWN_SPACE, Owner, owner_tag, space_key, space_parts

# the owner module alone, without importing shardsave (and torch) in every child
PRINT_TAG = (
    "import importlib.util, sys; "
    f"spec = importlib.util.spec_from_file_location('owner', {owner.__file__!r}); "
    "m = sys.modules['owner'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
    "print(m.owner_tag(), flush=True)"
)


def child(code: str = PRINT_TAG, *prefix: str) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def tag_of(proc: subprocess.Popen) -> Owner:
    parsed = Owner.parse(proc.stdout.readline().strip())
    assert parsed is not None
    return parsed[0]


def dead_owner() -> Owner:
    proc = child()
    who = tag_of(proc)
    proc.wait()
    return who


def test_tag_round_trips_and_names_this_process():
    here = Owner.current()
    assert here.pid == os.getpid() and here.space != UNKNOWN_SPACE and here.start > 0
    assert Owner.parse(f".x{owner_tag()}abcd1234", 2) == (here, 2 + len(here.tag))


def test_this_process_and_a_running_child_are_not_gone():
    assert not Owner.current().gone()
    proc = child(PRINT_TAG + "; import time; time.sleep(60)")
    try:
        who = tag_of(proc)
        assert who.pid == proc.pid and not who.gone()
    finally:
        proc.kill()
        proc.wait()
    assert who.gone()


def test_dead_process_is_gone():
    assert dead_owner().gone()


def test_zombie_is_gone():
    """Killed but not yet reaped by its parent: the pid is still taken, the writer is dead."""
    proc = child()
    who = tag_of(proc)
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{proc.pid}/stat").read_bytes().rpartition(b")")[2].split()[0] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert who.gone()
    finally:
        proc.wait()


def test_reused_pid_is_gone():
    """A live process under the writer's pid that started at another time is not the writer."""
    here = Owner.current()
    assert Owner(here.pid, here.start + 1, here.space).gone()


@pytest.mark.parametrize("part", ["host", "boot id", "pid namespace", "time namespace"])
def test_another_host_boot_or_namespace_proves_nothing(part):
    """Another container (same host name, another pid namespace), host or boot: its pids mean nothing here."""
    dead = dead_owner()
    parts = list(space_parts())
    parts[["host", "boot id", "pid namespace", "time namespace"].index(part)] += "x"
    assert not Owner(dead.pid, dead.start, space_key(tuple(parts))).gone()
    assert Owner(dead.pid, dead.start, space_key(space_parts())).gone()  # the forged space was the only change


def test_unreadable_proc_proves_nothing(monkeypatch):
    dead = dead_owner()
    monkeypatch.setattr(owner, "space_parts", lambda: None)
    monkeypatch.setattr(owner, "_CURRENT", {})  # this process's identity is read once: read it again
    assert Owner.current().space == UNKNOWN_SPACE
    assert not dead.gone()


def test_unknown_space_is_never_gone():
    dead = dead_owner()
    assert not Owner(dead.pid, dead.start, UNKNOWN_SPACE).gone()


def test_earlier_format_does_not_parse():
    """`<pid>-<host hash>-` (earlier versions) cannot tell containers apart: such leftovers are left alone."""
    assert Owner.parse("12345-0a1b2c3d-abcd1234") is None
    assert Owner.parse("0-1-0a1b2c3d4e5f-") is None  # pid 0 would signal this process's group


def _unshare(*flags: str) -> list[str]:
    if shutil.which("unshare") is None or subprocess.run(["unshare", *flags, "true"]).returncode != 0:
        pytest.skip("cannot create a pid namespace here")
    return ["unshare", *flags]


def test_writer_in_another_pid_namespace_is_kept():
    """A real container-like pid namespace: its writer is pid 1 there, and pid 1 here is another process."""
    proc = child(PRINT_TAG, *_unshare("--user", "--map-root-user", "--pid", "--fork", "--mount-proc"))
    who = tag_of(proc)
    proc.wait()
    assert who.pid == 1 and who.space not in (UNKNOWN_SPACE, Owner.current().space)
    assert not who.gone()


def test_proc_of_another_pid_namespace_gives_unknown_space():
    """In a new pid namespace that still sees the parent's /proc, "self" is another pid: nothing is trusted."""
    proc = child(PRINT_TAG, *_unshare("--user", "--map-root-user", "--pid", "--fork"))
    who = tag_of(proc)
    proc.wait()
    assert who.space == UNKNOWN_SPACE and not who.gone()


WRITER_IN_CONTAINER = """
import os, sys
from pathlib import Path
pid_wanted, root, dest = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open("/proc/sys/kernel/ns_last_pid", "w") as f:  # the next process here gets pid_wanted
    f.write(str(pid_wanted - 1))
child = os.fork()
if child:
    os._exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
assert os.getpid() == pid_wanted, os.getpid()
sys.path.insert(0, root)
from shardsave.storage import local

def fill(tmp):
    (tmp / "adapter_config.json").write_text("{}")
    print(tmp.name, flush=True)
    sys.stdin.readline()  # stay mid-publish until the test has tried to clean up

local.publish(dest, fill)
os._exit(0)
"""


def test_live_writer_in_another_container_keeps_its_directory(tmp_path):
    """A writer in another pid namespace on this host (same host name, same boot) whose pid does not exist
    here: a cleanup here must not take it for dead (earlier versions removed its half-built directory)."""
    prefix = _unshare("--user", "--map-root-user", "--pid", "--fork", "--mount-proc")
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    pid = next(p for p in range(pid_max // 2, pid_max) if not os.path.exists(f"/proc/{p}"))
    dest = tmp_path / "adapter"
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-c", WRITER_IN_CONTAINER, str(pid), root, str(dest)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        hidden = tmp_path / proc.stdout.readline().strip()
        assert hidden.is_dir() and hidden != tmp_path
        assert stale.remove_stale(dest) == []
        assert hidden.is_dir()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        proc.wait()
    assert (dest / "adapter_config.json").read_text() == "{}" and not hidden.exists()
