"""Benchmark: what the CLIs cost as whole processes (imports included), against what users run instead.

    python benchmarks/cli_imports.py                          # the 220M fp32 base, 3 runs each: ~6 min on 2 cores
    python benchmarks/cli_imports.py --tree /tmp/oldtree      # the same, with `shardsave` resolved in another tree
    python benchmarks/cli_imports.py --base smoke --repeat 1  # tiny: a smoke run
    python benchmarks/cli_imports.py --workdir /tmp/cb        # keeps the models: reruns skip their creation
    python benchmarks/cli_imports.py --only into               # only import torch, merge --into and PEFT's merge

Builds once (into --workdir): the "large" base of `bench_common.BASES` (Llama-shaped, ~220M parameters, fp32,
built from a config: nothing downloaded) saved with `save_pretrained`; a LoRA adapter on q_proj, v_proj (3 MiB,
lora_B randomised) saved beside it; and a DCP checkpoint of the whole PeftModel (`dcp.save` of
`get_model_state_dict`, one process) with the adapter config beside it. Then runs, each in a fresh interpreter,
interleaved, --repeat times (medians), its wall time and peak resident size (`/usr/bin/time`) taken for the
whole process:

- `import torch` alone: the floor every other figure is taken above;
- merge --into:      `python -m shardsave.merge ADAPTER --into BASE -o OUT`;
- peft merge:        PEFT's durable load-merge-save: `AutoModelForCausalLM.from_pretrained(BASE)`,
                     `PeftModel.from_pretrained`, `merge_and_unload()`, `save_pretrained(OUT)`, each file fsynced
                     (the CLI fsyncs what it publishes);
- rescue CLI:        `python -m shardsave.merge DCP -o OUT`;
- dcp_to_torch_save: `torch.distributed.checkpoint.format_utils.dcp_to_torch_save(DCP, file)`, `torch.load`, the
                     `lora_` keys kept under PEFT's names, `safetensors.torch.save_file`, fsynced.

And `python -X importtime` of the two CLI runs: the largest top-level imports by cumulative time, and whether
peft / transformers were imported. Goals (issue 24): merge --into >= 2x less time above `import torch` than
PEFT's durable load-merge-save; the rescue >= 5x less time than dcp_to_torch_save + filtering, and <= 2x the
adapter + 64 MiB of memory above `import torch`. Prints a table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import BASES, llama_config, lora_model  # noqa: E402

MIB = 2**20
METHODS = ("import torch", "merge --into", "peft merge", "rescue CLI", "dcp_to_torch_save")

PEFT_MERGE = r"""
import os, sys
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
model.save_pretrained(out)
for name in os.listdir(out):
    fd = os.open(os.path.join(out, name), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""

DCP_TO_TORCH = r"""
import os, sys, tempfile
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
dcp, out = sys.argv[1:3]
os.makedirs(out)
with tempfile.TemporaryDirectory(dir=out) as tmp:
    dcp_to_torch_save(dcp, os.path.join(tmp, "full.pt"))
    state = torch.load(os.path.join(tmp, "full.pt"), weights_only=True)
lora = {k.replace(".default.", "."): v.contiguous() for k, v in state.items() if "lora_" in k}
del state
path = os.path.join(out, "adapter_model.safetensors")
save_file(lora, path)
fd = os.open(path, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
"""


def prepare(work: Path, shape: dict) -> int:
    """Writes base/, adapter/ and ckpt/ (dcp/ and adapter_config.json) once; returns the adapter's bytes."""
    done = work / "done.json"
    if done.is_file():
        return json.loads(done.read_text())["adapter"]
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)  # lora_model seeds 0 too: the same base weights
    LlamaForCausalLM(llama_config(shape)).save_pretrained(str(work / "base"))
    model = lora_model(llama_config(shape), shape["rank"])
    model.peft_config["default"].base_model_name_or_path = str(work / "base")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(str(work / "adapter"))
    model.peft_config["default"].save_pretrained(str(work / "ckpt"))
    dcp.save(get_model_state_dict(model), checkpoint_id=str(work / "ckpt" / "dcp"))
    adapter = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    done.write_text(json.dumps({"adapter": adapter}))
    return adapter


def command(method: str, work: Path, out: Path, importtime: bool = False) -> list[str]:
    py = [sys.executable, *(["-X", "importtime"] if importtime else [])]
    if method == "import torch":
        return [*py, "-c", "import torch"]
    if method == "merge --into":
        return [*py, "-m", "shardsave.merge", str(work / "adapter"), "--into", str(work / "base"), "-o", str(out)]
    if method == "peft merge":
        return [*py, "-c", PEFT_MERGE, str(work / "base"), str(work / "adapter"), str(out)]
    if method == "rescue CLI":
        return [*py, "-m", "shardsave.merge", str(work / "ckpt" / "dcp"), "-o", str(out)]
    return [*py, "-c", DCP_TO_TORCH, str(work / "ckpt" / "dcp"), str(out)]


def env_for(tree: Path | None) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    if tree is not None:
        env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run(method: str, work: Path, tree: Path | None) -> dict:
    """One fresh process: wall seconds and peak resident MiB (GNU time)."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # no write-back of the previous run's pages lands in this one
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "-o", stats.name, *command(method, work, out)],
            cwd=tree or Path.cwd(),
            env=env_for(tree),
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
        wall, rss_kib = stats.read().split()[-2:]
    return {"time": float(wall), "rss": int(rss_kib) / 1024}


def importtime(method: str, work: Path, tree: Path | None, top: int = 8) -> dict:
    """`python -X importtime`: the largest top-level imports by cumulative microseconds; peft / transformers seen."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run(command(method, work, out, importtime=True), cwd=tree or Path.cwd(), env=env_for(tree),
                          capture_output=True, text=True)  # fmt: skip
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
            if not line.split("|")[2].startswith("  "):  # a top-level import (nested ones are indented)
                rows.append((int(cumulative), name))
    names = {line.split("|")[2].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    rows.sort(reverse=True)
    return {
        "top": [(name, round(us / 1e6, 3)) for us, name in rows[:top]],
        "total": round(sum(us for us, _ in rows) / 1e6, 3),
        "peft": "peft" in names,
        "transformers": "transformers" in names,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", choices=sorted(BASES), default="default", help="bench_common.BASES set")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tree", type=Path, help="resolve `shardsave` in this tree (PYTHONPATH and cwd)")
    parser.add_argument("--workdir", type=Path, help="keep the models here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    rows = "the rescue rows (import torch, rescue CLI, dcp_to_torch_save) or the --into rows only"
    parser.add_argument("--only", choices=("all", "rescue", "into"), default="all", help=rows)
    args = parser.parse_args()
    methods = {"all": METHODS, "rescue": ("import torch", "rescue CLI", "dcp_to_torch_save"),
               "into": ("import torch", "merge --into", "peft merge")}[args.only]  # fmt: skip
    shape = dict(BASES[args.base])["large"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cli-imports-"))
    work.mkdir(parents=True, exist_ok=True)
    adapter = prepare(work, shape)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeat):  # interleaved: a shared machine's load spreads over every method
        for method in methods:
            runs[method].append(run(method, work, args.tree))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("time", "rss")} for m, rs in runs.items()}
    floor = med["import torch"]
    imports = {m: importtime(m, work, args.tree) for m in ("merge --into", "rescue CLI") if m in methods}
    print(f"tree: {args.tree or 'cwd'}; base {args.base} large {shape}; adapter {adapter / MIB:.1f} MiB; "
          f"median of {args.repeat}")  # fmt: skip
    fastest = {m: min(r["time"] for r in rs) for m, rs in runs.items()}
    print(f"{'':20} {'wall s':>8} {'above torch s':>14} {'min wall s':>11} {'peak MiB':>9} {'above torch MiB':>16}")
    for m in methods:
        print(f"{m:20} {med[m]['time']:8.2f} {med[m]['time'] - floor['time']:14.2f} {fastest[m]:11.2f} "
              f"{med[m]['rss']:9.0f} {med[m]['rss'] - floor['rss']:16.0f}")  # fmt: skip
    above = {m: med[m]["time"] - floor["time"] for m in methods}
    if "merge --into" in methods:
        into = above["peft merge"] / above["merge --into"]
        print(f"merge --into vs PEFT durable merge, above import torch: {into:.2f}x (goal >= 2x)")
    if "rescue CLI" in methods:
        rescue = above["dcp_to_torch_save"] / above["rescue CLI"]
        memory = med["rescue CLI"]["rss"] - floor["rss"]
        limit = (2 * adapter + 64 * MIB) / MIB
        print(f"rescue CLI vs dcp_to_torch_save + filtering, above import torch: {rescue:.2f}x (goal >= 5x)")
        print(f"rescue CLI memory above import torch: {memory:.0f} MiB (goal <= {limit:.0f} MiB)")
    for m, found in imports.items():
        print(f"importtime {m}: peft {found['peft']}, transformers {found['transformers']}; top-level "
              f"{found['total']:.2f} s: " + ", ".join(f"{n} {s:.2f}" for n, s in found["top"]))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"tree": str(args.tree), "shape": shape, "adapter": adapter, "runs": runs,
                                         "median": med, "imports": imports}, indent=2))  # fmt: skip
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
