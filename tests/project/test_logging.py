"""The library is quiet by default and one switch (SHARDSAVE_LOG_LEVEL or enable_logging) prints its info lines,
as the README promises; every launch script uses that switch rather than configuring Python logging itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAVED = "shardsave: saved 1 adapter(s)"
SWITCH = "-- enable_logging --"

SCRIPT = f"""
import sys
import shardsave, tiny
from peft import LoraConfig

model = tiny.peft_model(LoraConfig(target_modules=["q_proj"], r=2))
shardsave.save_pretrained(model, sys.argv[1] + "/before")
print({SWITCH!r}, file=sys.stderr, flush=True)
shardsave.enable_logging()
shardsave.save_pretrained(model, sys.argv[1] + "/after")
"""


def save_twice(tmp_path: Path, **env: str) -> tuple[str, str]:
    """stderr of a plain user script before and after it calls shardsave.enable_logging()."""
    full_env = {k: v for k, v in os.environ.items() if k != "SHARDSAVE_LOG_LEVEL"}
    full_env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests/helpers")]),
    )
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=full_env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, _, after = proc.stderr.partition(SWITCH)
    return before, after


def test_quiet_by_default_and_enable_logging_prints_the_save(tmp_path):
    before, after = save_twice(tmp_path)
    assert SAVED not in before, before
    assert SAVED in after and str(tmp_path / "after") in after, after
    assert after.count(SAVED) == 1  # one handler, no second copy through the root logger


def test_environment_switch_prints_without_code():
    code = "from shardsave.log import logger; logger.info('probe %d', 7)"
    env = {k: v for k, v in os.environ.items() if k != "SHARDSAVE_LOG_LEVEL"}
    env["PYTHONPATH"] = str(ROOT)
    for value, expected in [("", ""), ("info", "shardsave: probe 7\n"), ("warning", "")]:
        proc = subprocess.run([sys.executable, "-c", code], env=dict(env, SHARDSAVE_LOG_LEVEL=value),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0 and proc.stderr == expected, (value, proc.stderr[-2000:])


def test_bad_level_names_the_levels():
    from shardsave import enable_logging

    with pytest.raises(ValueError, match="'loud' is not a logging level: use one of DEBUG, INFO"):
        enable_logging("loud")


def test_launch_scripts_use_the_switch_not_their_own_logging_setup():
    scripts = sorted((ROOT / "launch_scripts").glob("*.py"))
    assert scripts
    for script in scripts:
        assert "basicConfig" not in script.read_text(), f"{script.name} configures logging itself"
    assert "shardsave.enable_logging()" in (ROOT / "launch_scripts" / "common.py").read_text()
    for script in scripts:
        if script.name != "common.py":
            assert "from common import" in script.read_text(), f"{script.name} does not import common.py"
