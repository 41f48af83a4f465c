"""Benchmark: loading a saved adapter into a sharded model (`shardsave.load_pretrained`), against the native ways.

    python benchmarks/load.py                       # two bases (220M, 56M), 2 gloo ranks: a few minutes here
    python benchmarks/load.py --workdir /tmp/lb     # keeps the saved adapters: reruns skip their creation
    python benchmarks/load.py --small --repeat 1    # tiny bases: a smoke run (~1 min), not the goals' sizes
    python benchmarks/load.py --backends fsdp2,zero3

For each base (Llama-shaped, built from a config: nothing is downloaded; LoRA on q_proj, v_proj with the rank
chosen so that both bases carry the same adapter bytes, lora_B randomised) PEFT's own `save_pretrained` writes the
adapter once into --workdir. Then, for each backend, two gloo ranks on loopback (fresh processes, OMP_NUM_THREADS=1)
build the model, wrap it, and load the adapter by each method:
- fsdp2 (`fully_shard` per decoder layer and the root):
    shardsave:            shardsave.load_pretrained(model, adapter)
    set_model_state_dict: rank 0 reads the adapter file and names its tensors as the model does (PEFT's rule: the
                          adapter name inserted), the others pass {}; set_model_state_dict(model, sd,
                          StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
- fsdp1 (peft's `fsdp_auto_wrap_policy`, use_orig_params=True):
    shardsave; set_model_state_dict as above (torch's helper also takes FSDP1; it loads under FULL_STATE_DICT,
                          where FSDP1 unshards every unit: it materialises the model, unit by unit);
    summon_full_params:   every rank reads the file; FSDP.summon_full_params(model, writeback=True) + copy (every
                          parameter of the model gathered on every rank: the path that materialises the full model)
    FULL_STATE_DICT:      every rank reads the file; FSDP.state_dict_type(FULL_STATE_DICT) + load_state_dict(strict=
                          False) (FSDP1 unshards each unit, one at a time, to load into it)
- zero3 (a DeepSpeed ZeRO-3 engine, SGD, `stage3_param_persistence_threshold: 0`, CPU accelerator):
    shardsave (partitions and fp32 masters written);
    GatheredParameters:   rank 0 reads the file; deepspeed.zero.GatheredParameters(lora, modifier_rank=0) + copy on
                          rank 0. It writes the partitions but NOT the optimizer's fp32 masters: the next
                          `engine.step()` brings the old weights back.
    + fp32 masters:       the same, then every rank reads the file and calls safe_set_full_fp32_param per parameter
- ddp (every rank holds the whole model; a reference):
    shardsave; set_peft_model_state_dict: every rank reads the file (safetensors load_file) and calls PEFT's
    set_peft_model_state_dict.

Before every call the adapter is zeroed (each rank's own storage, and ZeRO-3's fp32 masters); after the timed calls
it is gathered the backend's own way (get_model_state_dict, summon_full_params, GatheredParameters and
safe_get_full_fp32_param, or directly) and compared with the saved tensors on every rank: "correct" in the table.
Time: barrier, call, barrier; the slowest rank's time of each call, median of --repeat calls after a warm-up, with
glibc's mmap threshold fixed at 128 KiB as in gathered_save.py. Memory: one more call per method, per rank: the
process's peak resident size during the call above its resident size just before it (the kernel's VmHWM, reset
through /proc/self/clear_refs), after malloc_trim(0), which releases the heap's free pages: a rank's share of one
LoRA tensor is 4-64 KiB here, below the mmap threshold, and would otherwise land in heap pages that earlier calls
freed and left resident, and not show.

Goals (issue 14), each printed PASS / FAIL: shardsave >= 2x faster than the best native path of each backend, and
>= 20x faster than any path that materialises the full model (FSDP1's three); its time flat in the base
size (the larger base within 1.25x of the smaller one, per backend); per-rank peak extra memory <= 2x that
rank's share of the adapter (adapter bytes / world size; under DDP a rank holds all of it). "The best native
path" is the fastest other row of the backend, whether it materialises the model or not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_common import BASES, child_env, llama_config, proc_status, reset_peak  # noqa: E402
from bench_common import lora_model as bench_lora  # noqa: E402
from bench_common import run_ranks as spawn_ranks  # noqa: E402

WORLD = 2
OURS = "shardsave"
#: Each backend's methods, shardsave's first: (name, whether it materialises the model).
METHODS = {
    "fsdp2": [(OURS, False), ("set_model_state_dict", False)],
    "fsdp1": [(OURS, False), ("set_model_state_dict", True), ("summon_full_params", True), ("FULL_STATE_DICT", True)],
    "zero3": [(OURS, False), ("GatheredParameters", False), ("GatheredParameters + fp32 masters", False)],
    "ddp": [(OURS, False), ("set_peft_model_state_dict", False)],
}
FLAT_LIMIT = 1.25
NATIVE_GOAL = 2.0
FULL_GOAL = 20.0
MIB = 2**20


# ---------------------------------------------------------------------------------------------- the model


def lora_model(shape: dict):
    """The PEFT model (seeded: the same base on every rank)."""
    return bench_lora(llama_config(shape), shape["rank"])


def create(folder: Path, shape: dict) -> None:
    """PEFT's save of the adapter, lora_B random so that it is not zero (run in a child process)."""
    import torch

    model = lora_model(shape)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model.save_pretrained(str(folder / "adapter"))
    n_params = sum(p.numel() for p in model.parameters())
    (folder / "done.json").write_text(json.dumps({"params": n_params, "shape": shape}))


def file_key(name: str, adapter: str = "default") -> str:
    """PEFT's file key of a model's parameter name (the rule set_peft_model_state_dict inverts)."""
    return name.replace(f".{adapter}.", ".")


def clean_name(name: str) -> str:
    """A parameter's name without the wrappers' components (as torch's state_dict helpers name it)."""
    for part in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(part, "")
    return name


# ---------------------------------------------------------------------------------------------- in a rank


class Rank:
    """One rank's wrapped model and its methods."""

    def __init__(self, backend: str, shape: dict, adapter: Path):
        import torch
        import torch.distributed as dist

        self.backend, self.adapter = backend, adapter
        self.file = str(adapter / "adapter_model.safetensors")
        if backend == "zero3":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        else:
            dist.init_process_group("gloo")
        self.rank = dist.get_rank()
        model = lora_model(shape)
        self.peft_model = model
        if backend == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            self.wrapped = model
        elif backend == "fsdp1":
            from peft.utils.other import fsdp_auto_wrap_policy
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            self.wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True,
                                auto_wrap_policy=fsdp_auto_wrap_policy(model))  # fmt: skip
        elif backend == "zero3":
            import deepspeed

            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            self.wrapped, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
                "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})  # fmt: skip
        else:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(model)
        # the adapter's parameters: clean name -> parameter, and the file key of each
        self.lora = {clean_name(n): p for n, p in self.wrapped.named_parameters() if "lora_" in n}
        self.keys = {name: file_key(name) for name in self.lora}

    # -- the methods

    def read_renamed(self) -> dict:
        """The adapter file's tensors under the model's names (what every native path starts from)."""
        from safetensors.torch import load_file

        saved = load_file(self.file)
        return {name: saved[key] for name, key in self.keys.items()}

    def method(self, name: str):
        import torch

        if name == OURS:
            import shardsave

            return lambda: shardsave.load_pretrained(self.wrapped, self.adapter)
        if name == "set_model_state_dict":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
            return lambda: set_model_state_dict(
                self.wrapped, self.read_renamed() if self.rank == 0 else {}, options=options
            )
        if name == "summon_full_params":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            def summon():
                state = self.read_renamed()
                with FSDP.summon_full_params(self.wrapped, writeback=True), torch.no_grad():
                    for n, p in self.lora.items():
                        p.copy_(state[n])

            return summon
        if name == "FULL_STATE_DICT":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import StateDictType

            def full():
                state = self.read_renamed()
                with FSDP.state_dict_type(self.wrapped, StateDictType.FULL_STATE_DICT):
                    self.wrapped.load_state_dict(state, strict=False)

            return full
        if name.startswith("GatheredParameters"):
            import deepspeed
            from deepspeed.utils import safe_set_full_fp32_param

            masters = name.endswith("masters")

            def gathered():
                state = self.read_renamed() if self.rank == 0 or masters else {}
                with deepspeed.zero.GatheredParameters(list(self.lora.values()), modifier_rank=0):
                    if self.rank == 0:
                        with torch.no_grad():
                            for n, p in self.lora.items():
                                p.copy_(state[n])
                if masters:
                    for n, p in self.lora.items():
                        safe_set_full_fp32_param(p, state[n])

            return gathered
        if name == "set_peft_model_state_dict":
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            return lambda: set_peft_model_state_dict(self.peft_model, load_file(self.file))
        raise ValueError(f"unknown method {name!r} for {self.backend}")

    # -- reset and check, the backend's own ways

    def zero(self) -> None:
        """Zeroes this rank's storage of the adapter (and ZeRO-3's fp32 masters), so that a load must write it."""
        import torch

        with torch.no_grad():
            for p in self.lora.values():
                if self.backend == "zero3":
                    from deepspeed.utils import safe_set_local_fp32_param

                    p.ds_tensor.zero_()
                    safe_set_local_fp32_param(p, torch.zeros_like(p.ds_tensor, dtype=torch.float32))
                elif self.backend == "fsdp2":
                    p.to_local().zero_()
                else:
                    p.zero_()

    def gathered(self) -> tuple[dict, dict | None]:
        """The adapter's full tensors by the backend's own gather (and ZeRO-3's fp32 masters), every rank."""
        masters = None
        if self.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
            state = get_model_state_dict(self.wrapped, options=options)
            values = {n: state[n].clone() for n in self.lora}
        elif self.backend == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(self.wrapped):
                values = {n: p.detach().clone() for n, p in self.lora.items()}
        elif self.backend == "zero3":
            import deepspeed
            from deepspeed.utils import safe_get_full_fp32_param

            with deepspeed.zero.GatheredParameters(list(self.lora.values())):
                values = {n: p.detach().clone() for n, p in self.lora.items()}
            masters = {n: safe_get_full_fp32_param(p).clone() for n, p in self.lora.items()}
        else:
            values = {n: p.detach().clone() for n, p in self.lora.items()}
        return values, masters

    def check(self) -> tuple[bool, bool | None]:
        """(the parameters equal the saved adapter, the fp32 masters do (ZeRO-3; None elsewhere))."""
        import torch

        saved = self.read_renamed()
        values, masters = self.gathered()
        ok = all(torch.equal(values[n], saved[n]) for n in saved)
        return ok, None if masters is None else all(torch.equal(masters[n], saved[n].float()) for n in saved)


def release_free_heap() -> None:
    """glibc's malloc_trim(0): the free pages inside the heap are given back (madvise), so that a call served from
    heap that earlier calls freed faults its pages in again and shows in the resident size."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def rank_main(backend: str, shape: dict, folder: Path, repeat: int) -> dict:
    """Every method on this rank: per call its time (barrier to barrier); then one more call for its peak extra
    memory; the checks."""
    import gc

    import torch.distributed as dist

    r = Rank(backend, shape, folder / "adapter")
    out = {"rank": r.rank, "methods": {}}
    for name, _ in METHODS[backend]:
        fn = r.method(name)
        seconds = []
        for _ in range(repeat + 1):  # the first a warm-up
            r.zero()
            gc.collect()
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            seconds.append(time.perf_counter() - start)
        correct, masters = r.check()
        # the memory call: the adapter's per-tensor buffers are 4-64 KiB here, below the mmap threshold, and glibc
        # would serve them from heap pages that earlier calls freed, still resident: those are released first
        r.zero()
        gc.collect()
        dist.barrier()
        release_free_heap()
        before = reset_peak()
        fn()
        extra = proc_status("VmHWM") - before
        dist.barrier()
        r.zero()
        out["methods"][name] = {"seconds": seconds[1:], "warmup_seconds": seconds[0], "extra_bytes": extra,
                                "correct": correct, "masters": masters}  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    return out


# ---------------------------------------------------------------------------------------------- the parent


def rank_env() -> dict:
    return child_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def run_ranks(backend: str, shape: dict, folder: Path, repeat: int) -> list[dict]:
    args = ["--child-rank", backend, json.dumps(shape), str(folder), str(repeat)]
    return spawn_ranks(HERE, args, WORLD, f"{backend} on {folder}")


def combine(ranks: list[dict], name: str) -> dict:
    """The slowest rank's time per call (median over calls), the highest peak per rank, the checks of all."""
    per = [r["methods"][name] for r in ranks]
    calls = [max(times) for times in zip(*(m["seconds"] for m in per), strict=True)]
    return {"seconds": statistics.median(calls), "calls": calls,
            "extra_bytes": [m["extra_bytes"] for m in per],  # per rank
            "correct": all(m["correct"] for m in per),
            "masters": None if per[0]["masters"] is None else all(m["masters"] for m in per)}  # fmt: skip


def run_base(name: str, shape: dict, workdir: Path, backends: list[str], repeat: int) -> dict:
    folder = workdir / "_".join(f"{k}{v}" for k, v in shape.items())
    if not (folder / "done.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, str(HERE), "--child-create", str(folder), json.dumps(shape)],
                              capture_output=True, text=True, env=rank_env())  # fmt: skip
        if proc.returncode:
            sys.exit(f"creating the adapter in {folder} failed:\n{proc.stderr[-4000:]}")
    params = json.loads((folder / "done.json").read_text())["params"]
    from safetensors.torch import load_file

    saved = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    adapter_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    result = {"name": name, "params": params, "shape": shape, "adapter_bytes": adapter_bytes, "backends": {}}
    for backend in backends:
        start = time.perf_counter()
        ranks = run_ranks(backend, shape, folder, repeat)
        methods = {m: combine(ranks, m) for m, _ in METHODS[backend]}
        result["backends"][backend] = methods
        print(f"{name} {params / 1e6:.0f}M {backend}: {time.perf_counter() - start:.0f} s", flush=True)
        for m, v in methods.items():
            print(f"  {m:36} {v['seconds'] * 1e3:9.1f} ms  +{max(v['extra_bytes']) / MIB:8.2f} MiB  "
                  f"correct: {v['correct']}  masters: {v['masters']}", flush=True)  # fmt: skip
    return result


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def share(r: dict, backend: str) -> float:
    """The bytes of the adapter a rank holds: its share where the backend shards it, all of it under DDP."""
    return r["adapter_bytes"] / (1 if backend == "ddp" else WORLD)


def report(results: list[dict], repeat: int) -> None:
    full = {(b, m) for b, ms in METHODS.items() for m, materialises in ms if materialises}
    print(f"\n{WORLD} gloo ranks; time: the slowest rank's, median of {repeat} calls after a warm-up; peak extra: "
          f"per rank, above its resident size before the call (a separate call, after malloc_trim)\n")  # fmt: skip
    print("| base | backend | method | materialises | time | rank 0 / rank 1 peak extra | / share | shardsave is | "
          "correct | fp32 masters |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for backend, methods in r["backends"].items():
            ours = methods[OURS]["seconds"]
            for m, v in methods.items():
                speed = "" if m == OURS else f"{v['seconds'] / ours:.1f}x faster"
                mem = " / ".join(f"{b / MIB:.2f}" for b in v["extra_bytes"])
                masters = "" if v["masters"] is None else ("written" if v["masters"] else "NOT written")
                ratio = max(v["extra_bytes"]) / share(r, backend)
                print(f"| {r['params'] / 1e6:.0f}M | {backend} | {m} | {'yes' if (backend, m) in full else ''} | "
                      f"{v['seconds'] * 1e3:.1f} ms | {mem} MiB | "
                      f"{ratio:.2f} | {speed} | {v['correct']} | {masters} |")  # fmt: skip
    for r in results:
        print(
            f"{r['name']} base {r['params'] / 1e6:.0f}M: adapter {r['adapter_bytes'] / MIB:.2f} MiB, per-rank "
            f"share {r['adapter_bytes'] / WORLD / MIB:.2f} MiB (DDP: all of it), bound 2 x share"
        )

    print("\nGoals:")
    large = results[0]
    for backend, methods in large["backends"].items():
        ours = methods[OURS]["seconds"]
        native = {m: v for m, v in methods.items() if m != OURS}
        if native:
            best = min(native, key=lambda m: native[m]["seconds"])
            speed = native[best]["seconds"] / ours
            print(f"  >= {NATIVE_GOAL:.0f}x faster than the best native path, {backend} ({best}): {speed:.1f}x: "
                  f"{verdict(speed >= NATIVE_GOAL)}")  # fmt: skip
        for m in methods:
            if (backend, m) in full:
                speed = methods[m]["seconds"] / ours
                print(f"  >= {FULL_GOAL:.0f}x faster than {m} (materialises the full model), {backend}: "
                      f"{speed:.1f}x: {verdict(speed >= FULL_GOAL)}")  # fmt: skip
    if len(results) > 1:
        small = results[1]
        for backend in large["backends"]:
            a, b = large["backends"][backend][OURS]["seconds"], small["backends"][backend][OURS]["seconds"]
            print(
                f"  time flat in the base, {backend} ({large['params'] / 1e6:.0f}M vs {small['params'] / 1e6:.0f}M): "
                f"{a * 1e3:.1f} vs {b * 1e3:.1f} ms = {a / b:.2f}x (<= {FLAT_LIMIT}x): {verdict(a / b <= FLAT_LIMIT)}"
            )
    for r in results:
        for backend, methods in r["backends"].items():
            bound = 2 * share(r, backend)
            extra = max(methods[OURS]["extra_bytes"])
            print(f"  per-rank extra memory <= 2 x share, {r['params'] / 1e6:.0f}M {backend}: {extra / MIB:.2f} <= "
                  f"{bound / MIB:.2f} MiB: {verdict(extra <= bound)}")  # fmt: skip
    correct = all(v["correct"] for r in results for ms in r["backends"].values() for v in ms.values())
    print(f"  every row loads the saved adapter (gathered and compared on every rank): {verdict(correct)}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-create":
        create(Path(sys.argv[2]), json.loads(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-rank":
        backend, shape, folder, repeat = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(rank_main(backend, shape, folder, repeat)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="keep the saved adapters here (default: a temporary folder)")
    parser.add_argument("--small", action="store_true", help="tiny bases: a smoke run, not the goals' sizes")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per method, after a warm-up (median)")
    parser.add_argument("--backends", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in METHODS]
    if unknown:
        parser.error(f"unknown backends {unknown}: choose from {list(METHODS)}")

    with tempfile.TemporaryDirectory(prefix="shardsave-load-") as tmp:
        workdir = args.workdir or Path(tmp)
        results = [run_base(name, shape, workdir, backends, args.repeat)
                   for name, shape in BASES["smoke" if args.small else "default"]]  # fmt: skip
        report(results, args.repeat)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
