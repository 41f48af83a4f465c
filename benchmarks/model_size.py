"""Benchmark: how a gathered save scales with the base model and with the adapter.

    python benchmarks/model_size.py                 # FSDP2, 2 ranks (runs gathered_save.py under torchrun)
    python benchmarks/model_size.py --backend zero3

Three base sizes at a fixed adapter (Llama-shaped, 16 layers, hidden 512 / 1024 / 2048 with LoRA rank
32 / 16 / 8 on q_proj, v_proj: 4 MiB of adapter each), then three adapters on the 1024-hidden base (rank 4
and 16 on q_proj, v_proj; rank 64 on every linear layer). shardsave's time should follow the adapter's
bytes, not the base model's size; the full-state-dict path follows the base model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
QV = "q_proj,v_proj"
ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
CASES = [
    ("base", dict(hidden=512, rank=32, targets=QV)),
    ("base", dict(hidden=1024, rank=16, targets=QV)),
    ("base", dict(hidden=2048, rank=8, targets=QV)),
    ("adapter", dict(hidden=1024, rank=4, targets=QV)),
    ("adapter", dict(hidden=1024, rank=64, targets=ALL)),
]  # the 1024 / rank 16 case belongs to both series


def run_case(backend: str, case: dict, repeat: int, paths: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(HERE / "gathered_save.py"), "--backend", backend, "--hidden", str(case["hidden"]),
            "--rank", str(case["rank"]), "--targets", case["targets"], "--repeat", str(repeat),
            "--paths", paths, "--json", str(out),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode != 0 or not out.exists():
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["fsdp2", "fsdp1", "zero3"], default="fsdp2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--paths", default="shardsave,full+filter,floor")
    args = parser.parse_args()

    rows = []
    for series, case in CASES:
        result = run_case(args.backend, case, args.repeat, args.paths)
        rows.append((series, case, result))
        r = result["results"]
        print(f"{series:8} {result['params'] / 1e6:6.0f}M  adapter {result['adapter_bytes'] / 2**20:6.1f} MiB  "
              f"shardsave {r['shardsave']['seconds'] * 1e3:7.1f} ms", flush=True)  # fmt: skip

    def ms(result, path):
        entry = result["results"].get(path)
        return f"{entry['seconds'] * 1e3:.1f} ms" if entry else "-"

    print(f"\n{args.backend}, 2 ranks, median of {args.repeat}\n")
    print("| series | base | adapter | shardsave | per MiB of adapter | full + filter | floor (`save_file`) |")
    print("|---|---|---|---|---|---|---|")
    base = [row for row in rows if row[0] == "base"]
    adapters = sorted([rows[1], *(row for row in rows if row[0] == "adapter")], key=lambda row: row[2]["adapter_bytes"])
    for series, series_rows in (("base", base), ("adapter", adapters)):
        for _, case, result in series_rows:
            mib = result["adapter_bytes"] / 2**20
            ours = result["results"]["shardsave"]["seconds"] * 1e3
            print(f"| {series} | {result['params'] / 1e6:.0f}M | {mib:.1f} MiB (r={case['rank']}, "
                  f"{'q,v' if case['targets'] == QV else 'all linear'}) | {ours:.1f} ms | {ours / mib:.1f} ms | "
                  f"{ms(result, 'full+filter')} | {ms(result, 'floor')} |")  # fmt: skip


if __name__ == "__main__":
    main()
