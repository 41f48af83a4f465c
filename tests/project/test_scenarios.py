"""The multi-rank scenarios' registry: tests/helpers/workers.py loads every tests/scenarios/scenarios_*.py, each
name a test passes to `run_ranks` is registered, and each registered scenario is run by some test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parents[1]
HELPERS = TESTS / "helpers"
#: A multi-rank test names its scenario as the first argument of multirank.run_ranks (threads.run_ranks takes a
#: world size instead), which tests/ranks/test_call_ids.py imports as run_processes.
CALL = re.compile(r"""(?:run_ranks|run_processes)\(\s*["'](\w+)["']""")


def registered() -> dict[str, str]:
    """Scenario name -> the module that registers it, read in a fresh interpreter as a rank would."""
    code = (
        "import json, sys, workers; workers.load_scenario_modules(); "
        "print(json.dumps({k: f.__module__ for k, f in workers.SCENARIOS.items()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=HELPERS, capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.splitlines()[-1])


def called() -> set[str]:
    return {name for path in TESTS.rglob("*.py") for name in CALL.findall(path.read_text())}


def test_every_scenario_called_is_registered_and_every_registered_one_called():
    scenarios = registered()
    assert sorted(called() - set(scenarios)) == []
    assert sorted(set(scenarios) - called()) == []


def test_scenarios_live_in_scenario_modules():
    """workers.py is the runner only; the scenarios are registered by tests/scenarios/scenarios_<operation>.py."""
    modules = set(registered().values())
    files = {p.stem for p in (TESTS / "scenarios").glob("scenarios_*.py")}
    assert modules == files
