"""Comparing a rescued adapter with the live one: the rescue CLI run in-process and file-by-file equality."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path


def rescue(*args) -> tuple[int, str]:
    from shardsave.cli.merge import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args] + ["--no-progress"])
    return code, err.getvalue()


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
