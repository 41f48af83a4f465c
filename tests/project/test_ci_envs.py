"""The oldest supported set that `.ci/setup` builds in `.ci/envs/oldest` is an environment of its own: it sees none of
the packages of the environment running the tests, so what is installed there later cannot break it (it read them
through a `.pth` before: transformers 5's `kernels` then conflicted with its huggingface_hub, and a `pip install trl`
in the main environment broke its `import transformers.trainer`), and `pip check` finds nothing broken in it."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OLDEST = ROOT / ".ci" / "envs" / "oldest" / "bin" / "python"


@pytest.mark.skipif(not OLDEST.exists(), reason="no .ci/envs/oldest here: `bash .ci/setup` makes it")
def test_oldest_environment_sees_nothing_of_the_running_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    probe = "import json, sys; print(json.dumps([sys.prefix, sys.path]))"
    proc = subprocess.run([str(OLDEST), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    prefix, path = json.loads(proc.stdout)
    if Path(prefix).resolve() == Path(sys.prefix).resolve():
        pytest.skip("running inside .ci/envs/oldest")
    ours = [str(Path(d).resolve()) for d in site.getsitepackages()]
    shared = [p for p in path if p and any(str(Path(p).resolve()).startswith(d) for d in ours)]
    assert not shared, f".ci/envs/oldest reads this environment's packages through {shared}: rerun `bash .ci/setup`"
    check = subprocess.run([str(OLDEST), "-m", "pip", "check"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
