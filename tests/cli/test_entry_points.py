"""`import shardsave` gives every public name, and the command-line modules run as `python -m` without runpy's
warning: the package imports its modules on first use, so `shardsave.verify` / `shardsave.merge` are not already in
`sys.modules` when runpy executes them (it warned "found in sys.modules after import of package 'shardsave', but
prior to execution", and the module then existed twice)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["shardsave.verify", "shardsave.merge"])
def test_command_line_modules_run_without_a_runpy_warning(module):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]


def test_every_public_name_is_importable_and_the_import_is_light():
    code = (
        "import sys, shardsave\n"
        "eager = sorted(m for m in sys.modules if m.startswith('shardsave.'))\n"
        "ns = {}\n"
        "exec('from shardsave import *', ns)\n"
        "missing = [n for n in shardsave.__all__ if n not in ns or getattr(shardsave, n) is not ns[n]]\n"
        "print(eager, missing, set(shardsave.__all__) <= set(dir(shardsave)), sep='|')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    eager, missing, listed = proc.stdout.strip().split("|")
    assert eager == "[]", f"`import shardsave` imported {eager}"
    assert missing == "[]", f"not importable from shardsave: {missing}"
    assert listed == "True"
    import shardsave

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        shardsave.nope  # noqa: B018
