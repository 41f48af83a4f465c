"""Run a multi-rank scenario (tests/scenarios/, through the runner tests/helpers/workers.py) on N gloo ranks in
separate processes (as torchrun would)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
# Set by conftest.py when the session deselects multi-rank tests (`-m "not multirank"`): a test or fixture that
# starts ranks without carrying the marker is then skipped where it would start them.
SKIP_REASON = ""


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str
    result: dict

    @property
    def error(self) -> str:
        return self.result.get("error", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    scenario: str, tmp_path: Path, *, world_size: int = 2, limit: float = 240, extra_env: dict | None = None, **params
) -> list[RankResult]:
    if SKIP_REASON:
        import pytest

        pytest.skip(SKIP_REASON)
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), str(HERE)]),
        )
        env.update(extra_env or {})
        cmd = [sys.executable, str(HERE / "workers.py"), scenario, str(tmp_path), json.dumps(params)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"{scenario}: rank {rank} still running after {limit} s (a hang)") from None
        path = tmp_path / f"result-{rank}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        results.append(RankResult(rank, proc.returncode, out, result))
    return results


def check_ok(results: list[RankResult]) -> None:
    for r in results:
        assert r.returncode == 0 and r.result.get("ok"), f"rank {r.rank} failed:\n{r.output[-4000:]}"
