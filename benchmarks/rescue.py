"""Benchmark: rescuing the adapter out of a full training checkpoint, against what users do today.

    python benchmarks/rescue.py                      # two bases (220M, 56M): ~8 min here, 1 of it writing checkpoints
    python benchmarks/rescue.py --workdir /tmp/rb    # keeps the checkpoints: reruns skip their creation
    python benchmarks/rescue.py --small --repeat 1   # tiny bases: a smoke run (~1 min), not the goals' sizes
    python benchmarks/rescue.py --cold               # evict the checkpoints from the page cache before each run

For each base (Llama-shaped, built from a config: nothing is downloaded; LoRA on q_proj, v_proj with the rank
chosen so that both bases carry the same adapter bytes, lora_B randomised) it writes, once, into --workdir:
`config/config.json` (the base's config, which the adapter config's `base_model_name_or_path` names),
`adapter_config.json`, and three checkpoints of the whole PEFT model: `dcp/` (`dcp.save` of
`get_model_state_dict`, one process, no process group), `zero2/` and `zero3/` (a 1-rank gloo DeepSpeed engine,
one SGD step, `engine.save_checkpoint`), each with the live adapter beside it (`<name>.reference.safetensors`,
PEFT's key names) to check every output against.

Then it runs, each in a fresh interpreter so that memory is the process's own:
- shardsave:      shardsave.rescue.checkpoint.rescue_adapter(checkpoint, out) on each checkpoint (the first call in the
                  process: what the CLI runs);
- shardsave CLI:  `python -m shardsave.merge checkpoint -o out`, run with runpy after `import torch`, so that its
                  own imports (peft and transformers, which the rescue needs) count in its time and memory;
- dcp_to_torch:   torch.distributed.checkpoint.format_utils.dcp_to_torch_save(dcp, file), torch.load, keep the
                  `lora_` keys, safetensors save_file;
- accelerate:     accelerate.utils.merge_fsdp_weights(dcp, dir) (what `accelerate merge-weights` runs; it takes a
                  plain DCP folder as well as accelerate's `pytorch_model_fsdp_0`), then only the `lora_` keys
                  read back from its model.safetensors (safe_open) and saved;
- zero_to_fp32:   deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(dir), filter, save_file;
- zero_to_fp32 lazy: the same with lazy_mode=True (DeepSpeed's most frugal path: only the `lora_` keys are made
                  into tensors).
Imports: each method's modules, timed and measured from the bare interpreter (torch included). Time: the call's
wall time after the imports and a gc.collect(), median of --repeat processes. Memory: the process's peak
resident size during the call above its resident size just before it (the kernel's VmHWM, reset through
/proc/self/clear_refs; file pages mapped by the call count; the highest of the processes), with glibc's mmap
threshold fixed as in gathered_save.py so that freed buffers leave the resident size. The page cache is warm
unless --cold.

Goals (issue 13), each printed PASS / FAIL: the rescue's peak extra memory <= 2x the adapter + 64 MiB at every
base size (the call after its imports, and the CLI process above `import torch`); its DCP time flat in the base
size (here: the larger base within 1.25x of the smaller one); >= 10x faster than each baseline on the larger
base (the calls, imports apart).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_common import BASES, child_env, free_port, llama_config, proc_status  # noqa: E402
from bench_common import lora_model as bench_lora  # noqa: E402
from bench_common import reset_peak as bench_reset_peak  # noqa: E402

FORMATS = ("dcp", "zero2", "zero3")
CLI = "shardsave CLI"
#: The methods run on each format, shardsave's first.
METHODS = {
    "dcp": ("shardsave", CLI, "dcp_to_torch", "accelerate"),
    "zero2": ("shardsave", CLI, "zero_to_fp32", "zero_to_fp32 lazy"),
    "zero3": ("shardsave", CLI, "zero_to_fp32", "zero_to_fp32 lazy"),
}
FLAT_LIMIT = 1.25
SPEEDUP_GOAL = 10.0
MIB = 2**20


# ---------------------------------------------------------------------------------------------- checkpoints


def lora_model(shape: dict, config_dir: Path):
    """The PEFT model, the same weights at every call (seeded); lora_B random so that the adapter is not zero."""
    import torch

    config = llama_config(shape)
    config.save_pretrained(config_dir)
    model = bench_lora(config, shape["rank"])
    model.peft_config["default"].base_model_name_or_path = str(config_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model


def peft_names(state: dict) -> dict:
    """PEFT's file keys for the LoRA tensors of a full state dict (the adapter name dropped)."""
    return {k.replace(".default.", "."): v.detach().clone().contiguous() for k, v in state.items() if "lora_" in k}


def create(folder: Path, shape: dict) -> None:
    """Writes the base's config, the adapter config and the three checkpoints (run in a child process)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = lora_model(shape, folder / "config")
    model.peft_config["default"].save_pretrained(folder)  # adapter_config.json beside the checkpoints
    n_params = sum(p.numel() for p in model.parameters())

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model)
    dcp.save(state, checkpoint_id=str(folder / "dcp"))  # one process, no process group
    save_file(peft_names(state), str(folder / "dcp.reference.safetensors"))
    del model, state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")  # fmt: skip
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (2, 3):
        model = lora_model(shape, folder / "config")
        lora = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(lora, lr=0.1), config={
            "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}})  # fmt: skip
        ids = torch.randint(shape["vocab"], (1, 16), generator=torch.Generator().manual_seed(1))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        engine.save_checkpoint(str(folder / f"zero{stage}"))
        with deepspeed.zero.GatheredParameters(lora, enabled=stage == 3):
            live = peft_names(dict(engine.module.named_parameters()))
        save_file(live, str(folder / f"zero{stage}.reference.safetensors"))
        engine.destroy()
        del engine, model
    (folder / "done.json").write_text(json.dumps({"params": n_params, "shape": shape}))


# ---------------------------------------------------------------------------------------------- one method


def rescue(source: Path, out: Path) -> None:
    """shardsave's call, the one place this script touches the feature."""
    from shardsave.rescue.checkpoint import rescue_adapter

    rescue_adapter(source, out, overwrite=True)


def imports(method: str) -> None:
    """What each method imports before its call (the level its memory is measured above)."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    if method == "shardsave":
        import peft  # noqa: F401  (imported by the call, to build the PEFT model's structure on the meta device)
        import transformers  # noqa: F401

        import shardsave.rescue  # noqa: F401
    elif method == "dcp_to_torch":
        import torch.distributed.checkpoint.format_utils  # noqa: F401
    elif method == "accelerate":
        import accelerate.utils  # noqa: F401
    else:
        import deepspeed.utils.zero_to_fp32  # noqa: F401


def run_method(method: str, source: Path, out: Path) -> None:
    """One rescue by `method`: the adapter of `source` in `out/adapter_model.safetensors` (PEFT's keys)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    target = str(out / "adapter_model.safetensors")
    if method == "shardsave":
        rescue(source, out)
    elif method == "dcp_to_torch":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(source, out / "full.pt")
        save_file(peft_names(torch.load(out / "full.pt")), target)
    elif method == "accelerate":
        from accelerate.utils import merge_fsdp_weights

        merge_fsdp_weights(str(source), str(out / "merged"))
        with safe_open(str(out / "merged" / "model.safetensors"), "pt") as f:
            save_file(peft_names({k: f.get_tensor(k) for k in f.keys() if "lora_" in k}), target)
    elif method == "zero_to_fp32":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        save_file(peft_names(get_fp32_state_dict_from_zero_checkpoint(str(source))), target)
    elif method == "zero_to_fp32 lazy":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        lazy = get_fp32_state_dict_from_zero_checkpoint(str(source), lazy_mode=True)
        save_file(peft_names({k: v.contiguous() for k, v in lazy.items() if "lora_" in k}), target)
    else:
        raise ValueError(f"unknown method {method!r}")


def reset_peak() -> int:
    """`bench_common.reset_peak` after a full garbage collection (the one the imports' objects would otherwise
    trigger inside the call)."""
    import gc

    gc.collect()
    return bench_reset_peak()


def measure_child(method: str, source: Path, out: Path) -> dict:
    """In a fresh process: the imports' time and resident size, then the call's wall time and peak resident
    size above the level after the imports."""
    bare, start = proc_status("VmRSS"), time.perf_counter()
    imports(method)
    import_seconds = time.perf_counter() - start
    before = reset_peak()
    start = time.perf_counter()
    run_method(method, source, out)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_bytes": proc_status("VmHWM") - before,
            "import_seconds": import_seconds, "import_bytes": before - bare}  # fmt: skip


def cli_child(source: Path, out: Path) -> dict:
    """`python -m shardsave.merge SOURCE -o OUT` in this process after `import torch` (every torch tool's start):
    its wall time and peak resident size above that, its own imports and first-call costs included."""
    import runpy

    import torch  # noqa: F401

    before = reset_peak()
    sys.argv = ["shardsave.merge", str(source), "-o", str(out), "--overwrite"]
    start = time.perf_counter()
    try:
        runpy.run_module("shardsave.merge", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code:
            raise
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_bytes": proc_status("VmHWM") - before}


# ---------------------------------------------------------------------------------------------- the parent


def child(args: list[str], what: str) -> str:
    proc = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True, env=child_env())
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def evict(folder: Path) -> None:
    """Drops the folder's files from the page cache (clean pages only, hence the fsync first)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(method: str, source: Path, out: Path, repeat: int, cold: bool) -> dict:
    """Median time and highest peak of `repeat` fresh processes (`python -m shardsave.merge` for CLI)."""
    runs = []
    for _ in range(repeat):
        if cold:
            evict(source)
        mode = ["--child-cli"] if method == CLI else ["--child-measure", method]
        stdout = child([*mode, str(source), str(out)], f"{method} on {source}")
        runs.append(json.loads(stdout.strip().splitlines()[-1]))
    result = {"seconds": statistics.median(r["seconds"] for r in runs),
              "extra_bytes": max(r["extra_bytes"] for r in runs), "runs": runs}  # fmt: skip
    if method != CLI:
        result["import_seconds"] = statistics.median(r["import_seconds"] for r in runs)
        result["import_bytes"] = max(r["import_bytes"] for r in runs)
    return result


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].equal(y[k]) for k in x)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_base(name: str, shape: dict, workdir: Path, repeat: int, cold: bool) -> dict:
    folder = workdir / "_".join(f"{k}{v}" for k, v in shape.items())
    if not (folder / "done.json").exists():
        start = time.perf_counter()
        child(["--child-create", str(folder), json.dumps(shape)], f"creating the checkpoints in {folder}")
        print(f"{name}: checkpoints written in {time.perf_counter() - start:.0f} s ({folder})", flush=True)
    params = json.loads((folder / "done.json").read_text())["params"]
    result = {"name": name, "params": params, "shape": shape, "formats": {}}
    for fmt in FORMATS:
        source, reference = folder / fmt, folder / f"{fmt}.reference.safetensors"
        entry = {"checkpoint_bytes": folder_bytes(source), "methods": {}}
        for method in METHODS[fmt]:
            out = folder / "out" / fmt / method.replace(" ", "_")
            m = measure(method, source, out, repeat, cold)
            m["correct"] = same_tensors(out / "adapter_model.safetensors", reference)
            entry["methods"][method] = m
            print(f"  {name:5} {fmt:5} {method:18} {m['seconds'] * 1e3:9.1f} ms  "
                  f"+{m['extra_bytes'] / MIB:8.1f} MiB  correct: {m['correct']}", flush=True)  # fmt: skip
        result["formats"][fmt] = entry
    from safetensors.torch import load_file

    result["adapter_bytes"] = sum(t.numel() * t.element_size() for t in load_file(str(reference)).values())
    return result


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(results: list[dict], repeat: int, cold: bool) -> None:
    large, small = results
    print(f"\nmedian time of {repeat} fresh processes per row, highest peak; page cache {'cold' if cold else 'warm'}. "
          f"imports: from the bare interpreter; peak extra: above the level after the imports (the CLI: after "
          f"`import torch`, its own imports and first-call costs included)\n")  # fmt: skip
    print(
        "| base | checkpoint | method | imports | call | peak extra | extra / bound | shardsave is | output correct |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        bound = 2 * r["adapter_bytes"] + 64 * MIB
        for fmt, entry in r["formats"].items():
            ours = entry["methods"]["shardsave"]["seconds"]
            for method, m in entry["methods"].items():
                speed = "" if method in ("shardsave", CLI) else f"{m['seconds'] / ours:.1f}x faster"
                imported = (
                    f"{m['import_seconds']:.2f} s, {m['import_bytes'] / MIB:.0f} MiB" if "import_bytes" in m else ""
                )
                print(f"| {r['params'] / 1e6:.0f}M | {fmt} ({entry['checkpoint_bytes'] / MIB:.0f} MiB) | {method} | "
                      f"{imported} | {m['seconds'] * 1e3:.1f} ms | {m['extra_bytes'] / MIB:.1f} MiB | "
                      f"{m['extra_bytes'] / bound:.2f} | {speed} | {m['correct']} |")  # fmt: skip
    print()
    for r in results:
        adapter = r["adapter_bytes"]
        print(f"{r['name']} base {r['params'] / 1e6:.0f}M: adapter {adapter / MIB:.2f} MiB, bound 2 x adapter + "
              f"64 MiB = {(2 * adapter + 64 * MIB) / MIB:.1f} MiB")  # fmt: skip

    print("\nGoals:")
    for method, what in (("shardsave", "the call, after its imports"), (CLI, "the CLI process, after import torch")):
        for r in results:
            bound = 2 * r["adapter_bytes"] + 64 * MIB
            for fmt, entry in r["formats"].items():
                extra = entry["methods"][method]["extra_bytes"]
                print(f"  memory <= 2 x adapter + 64 MiB, {what}, {r['name']} {fmt}: {extra / MIB:.1f} <= "
                      f"{bound / MIB:.1f} MiB: {verdict(extra <= bound)}")  # fmt: skip
    t_large = large["formats"]["dcp"]["methods"]["shardsave"]["seconds"]
    t_small = small["formats"]["dcp"]["methods"]["shardsave"]["seconds"]
    ratio = t_large / t_small
    print(f"  DCP time flat in the base ({large['params'] / small['params']:.1f}x the parameters): "
          f"{t_large * 1e3:.1f} vs {t_small * 1e3:.1f} ms = {ratio:.2f}x (<= {FLAT_LIMIT}x): "
          f"{verdict(ratio <= FLAT_LIMIT)}")  # fmt: skip
    for fmt, entry in large["formats"].items():
        ours = entry["methods"]["shardsave"]["seconds"]
        for method, m in entry["methods"].items():
            if method not in ("shardsave", CLI):
                speed = m["seconds"] / ours
                print(f"  >= {SPEEDUP_GOAL:.0f}x faster than {method} on {fmt}, {large['params'] / 1e6:.0f}M: "
                      f"{speed:.1f}x: {verdict(speed >= SPEEDUP_GOAL)}")  # fmt: skip
    correct = all(m["correct"] for r in results for e in r["formats"].values() for m in e["methods"].values())
    print(f"  every output equals the live adapter: {verdict(correct)}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-create":
        create(Path(sys.argv[2]), json.loads(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-measure":
        print(json.dumps(measure_child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-cli":
        print(json.dumps(cli_child(Path(sys.argv[2]), Path(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: a temporary folder)")
    parser.add_argument("--small", action="store_true", help="tiny bases: a smoke run, not the goals' sizes")
    parser.add_argument("--bases", choices=sorted(BASES), default=None, help="the pair of bases (default: default)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per method (median time)")
    parser.add_argument("--cold", action="store_true", help="evict each checkpoint from the page cache first")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="shardsave-rescue-") as tmp:
        workdir = args.workdir or Path(tmp)
        results = [run_base(name, shape, workdir, args.repeat, args.cold)
                   for name, shape in BASES[args.bases or ("smoke" if args.small else "default")]]  # fmt: skip
        report(results, args.repeat, args.cold)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
