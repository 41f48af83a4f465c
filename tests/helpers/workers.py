"""Per-rank runner of the multi-rank tests. Run by tests/helpers/multirank.py as `workers.py SCENARIO DIR PARAMS`.

The scenarios live in tests/scenarios/scenarios_<operation>.py and register with `@scenario`; what they share is in
scenario_tools.py and kill_points.py. Each scenario returns a JSON-able dict; an exception becomes
{"ok": false, "error": ..., "type": ...} so that the test can assert on the error every rank raised.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

SCENARIOS = {}


def scenario(fn):
    """Register `fn` under its name, the one the tests pass to `run_ranks` (a name taken twice is refused)."""
    if fn.__name__ in SCENARIOS:
        raise ValueError(f"two scenarios named {fn.__name__}")
    SCENARIOS[fn.__name__] = fn
    return fn


def main() -> None:
    name, out, params = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = os.environ.get("SHARDSAVE_TEST_PG", "gloo")
    if name != "accelerate_save":  # accelerate sets up its own process group
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = {"ok": True, **(SCENARIOS[name](rank, world, out, params) or {})}
    except Exception as exc:
        traceback.print_exc()
        result = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
    (out / f"result-{rank}.json").write_text(json.dumps(result))
    # leave together, then skip interpreter teardown: a rank that tore down gloo while its peer was still
    # busy occasionally aborted in C++ ("terminate called without an active exception") after its result
    # was written
    try:
        if dist.is_initialized() and not params.get("no_barrier"):
            dist.monitored_barrier(timeout=timedelta(seconds=30)) if backend == "gloo" else dist.barrier()
            dist.destroy_process_group()
    except Exception:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def load_scenario_modules() -> None:
    """The scenarios of each operation live in `tests/scenarios/scenarios_<topic>.py` (they register with
    `workers.scenario`)."""
    import importlib

    sys.modules.setdefault("workers", sys.modules[__name__])
    folder = Path(__file__).parents[1] / "scenarios"
    sys.path.insert(0, str(folder))
    for path in sorted(folder.glob("scenarios_*.py")):
        importlib.import_module(path.stem)


if __name__ == "__main__":
    load_scenario_modules()
    main()
