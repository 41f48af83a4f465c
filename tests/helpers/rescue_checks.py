"""Comparing a rescued adapter with the live one: the rescue CLI run in-process and file-by-file equality.

Every rescue a test makes through `rescue` runs twice: first with the PEFT skeleton forced
(`shardsave.rescue.fast.SKELETON_SWITCH`) into a folder of its own, then as asked (the fast path where it
applies); where the second succeeds, so must the first, and every file the first wrote must be, byte for byte,
in the second's output.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from shardsave.rescue.fast import SKELETON_SWITCH


def _run(args: list[str]) -> tuple[int, str]:
    from shardsave.cli.merge import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args + ["--no-progress"])
    return code, err.getvalue()


def rescue(*args) -> tuple[int, str]:
    args = [str(a) for a in args]
    if "-o" not in args or os.environ.get(SKELETON_SWITCH) or "--into" in args:
        return _run(args)
    at = args.index("-o") + 1
    scratch = Path(tempfile.mkdtemp(prefix="rescue-skeleton-"))
    try:
        skeleton = scratch / "out"
        os.environ[SKELETON_SWITCH] = "1"
        try:  # first: an in-place rescue changes its source
            code_skeleton, _ = _run(args[:at] + [str(skeleton)] + args[at + 1 :])
        finally:
            del os.environ[SKELETON_SWITCH]
        code, err = _run(args)
        if code == 0:  # (a rescue refused for its destination alone may succeed into the scratch folder)
            assert code_skeleton == 0, "the skeleton path failed where the fast path did not"
            out = Path(args[at])
            for f in sorted(p.relative_to(skeleton) for p in skeleton.rglob("*") if p.is_file()):
                assert (out / f).read_bytes() == (skeleton / f).read_bytes(), f"{f}: the two paths differ"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return code, err


def same_files(a: Path, b: Path) -> None:
    """Byte for byte; adapter_config.json too, except the order of the set-valued fields (target_modules), which
    PEFT writes in the order of Python's per-process string hashing (two saves of one model by two processes
    differ there)."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        if f.name == "adapter_config.json":
            x, y = json.loads((a / f).read_text()), json.loads((b / f).read_text())
            for key in ("target_modules", "modules_to_save"):
                if isinstance(x.get(key), list) and isinstance(y.get(key), list):
                    assert sorted(x.pop(key)) == sorted(y.pop(key)), (f, key)
            assert x == y, f
            continue
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
