"""Benchmark: the offline merge (`python -m shardsave.merge ADAPTER --into BASE`) against PEFT's load +
`merge_and_unload()` + `save_pretrained()`, side by side in one run.

    python benchmarks/merged.py                    # the 220M base ("large" of bench_common.BASES), fp32: ~1 min
    python benchmarks/merged.py --base smoke       # tiny: a smoke run
    python benchmarks/merged.py --repeat 5         # each method 5 times, interleaved: medians (a shared machine)

The base (Llama-shaped, built from a config: nothing downloaded) is saved once with `save_pretrained`
(max_shard_size 200MB, so several shards) and a LoRA adapter (q_proj, v_proj, lora_B randomised) beside it.
Each method runs in a fresh interpreter after its imports and a gc.collect(); time is the call's wall time,
memory the process's peak resident size during the call above its resident size just before it (VmHWM reset
through /proc/self/clear_refs; glibc's mmap threshold fixed). Dirty pages are flushed (`os.sync`) before each run, so
neither method pays for writing back what the one before it left in the page cache (PEFT does not fsync). Both
outputs are compared tensor for tensor.
Goals (issue 16): >= 2x faster; peak extra memory <= 2x the largest tensor + the adapter.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import BASES, child_env, llama_config, lora_model  # noqa: E402

CHILD = r"""
import gc, json, sys, time
sys.path.insert(0, {bench!r})
from bench_common import reset_peak, proc_status
method, base, adapter, out = sys.argv[1:5]
if method == "peft":
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
else:
    import peft, transformers  # imports apart, as for PEFT (merge_into imports them)
    from shardsave.merged.offline import merge_into
gc.collect()
before = reset_peak()
t = time.perf_counter()
if method == "peft":
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size="200MB")
else:
    merge_into(adapter, base, out, max_shard_size="200MB")
elapsed = time.perf_counter() - t
print(json.dumps({{"time": elapsed, "peak": proc_status("VmHWM") - before}}))
"""


def _prepare(work: Path, shape: dict) -> tuple[Path, Path, int, int]:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)  # the base lora_model builds (it seeds 0 too), saved without the LoRA layers
    base = LlamaForCausalLM(llama_config(shape))
    base.save_pretrained(str(work / "base"), max_shard_size="200MB")
    largest = max(p.numel() * p.element_size() for p in base.parameters())
    del base
    model = lora_model(llama_config(shape), shape["rank"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.save_pretrained(str(work / "adapter"))
    adapter = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora" in n)
    return work / "base", work / "adapter", largest, adapter


def _run(method: str, base: Path, adapter: Path, out: Path) -> dict:
    code = CHILD.format(bench=str(Path(__file__).resolve().parent))
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    done = subprocess.run(
        [sys.executable, "-c", code, method, str(base), str(adapter), str(out)],
        env=child_env(),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _same(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    for f in sorted(b.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fb, safe_open(str(a / f.name), "pt") as fa:
            if list(fa.keys()) != list(fb.keys()) or not all(torch.equal(fa.get_tensor(k), fb.get_tensor(k))
                                                             for k in fb.keys()):  # fmt: skip
                return False
    index = "model.safetensors.index.json"  # none when unsharded (the smoke base)
    return (b / index).is_file() == (a / index).is_file() and (
        not (b / index).is_file() or (a / index).read_bytes() == (b / index).read_bytes()
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="default", choices=list(BASES))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each method, interleaved; medians reported")
    args = parser.parse_args()
    name, shape = BASES[args.base][0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, adapter, largest, adapter_bytes = _prepare(work, shape)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        runs: dict[str, list[dict]] = {"peft": [], "shardsave": []}
        for _ in range(args.repeat):
            for method, found in runs.items():
                found.append(_run(method, base, adapter, work / method))
        same = _same(work / "shardsave", work / "peft")
    peft, ours = ({k: statistics.median(r[k] for r in found) for k in ("time", "peak")} for found in runs.values())
    mib = 1 << 20
    print(f"base {name} {shape}: {size / mib:.0f} MiB of weights, largest tensor {largest / mib:.0f} MiB, adapter "
          f"{adapter_bytes / mib:.1f} MiB; outputs identical: {same}")  # fmt: skip
    if args.repeat > 1:
        for method, found in runs.items():
            times = " ".join(f"{r['time']:.2f}" for r in found)
            print(f"{method} times (s): {times}")
    print(f"{'method':<28}{'time (s)':>10}{'peak extra (MiB)':>18}")
    print(f"{'PEFT load+merge+save':<28}{peft['time']:>10.2f}{peft['peak'] / mib:>18.0f}")
    print(f"{'shardsave merge --into':<28}{ours['time']:>10.2f}{ours['peak'] / mib:>18.0f}")
    bound = 2 * largest + adapter_bytes
    fast = "PASS" if peft["time"] >= 2 * ours["time"] else "FAIL"
    small = "PASS" if ours["peak"] <= bound else "FAIL"
    print(f"speed-up {peft['time'] / ours['time']:.1f}x (goal >= 2x: {fast}); peak {ours['peak'] / mib:.0f} MiB vs "
          f"2x largest + adapter = {bound / mib:.0f} MiB ({small}); memory ratio "
          f"{peft['peak'] / max(ours['peak'], 1):.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
