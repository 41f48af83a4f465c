"""In-training merged weights: `shardsave.save_merged` vs what users do today, on 2 gloo ranks, side by side.

Today (peft#297, axolotl#3294, PEFT PR#2446's tip): gather the full state dict on rank 0 (FSDP2:
`get_model_state_dict(full_state_dict=True, cpu_offload=True)`; ZeRO-3: `_zero3_consolidated_16bit_state_dict()`),
load it into a CPU copy of the PeftModel there, `merge_and_unload()`, `save_pretrained()`. Both write the same
files (checked). Printed per backend: rank 0's time per call (median of `--repeat` after a warm-up) and its
peak extra resident memory during the call, the ratios, and what proving the parallel write costs rank 0 per call
(the CRC-32 of what it writes, and reading its ranges back: timed inside the same calls, so the share holds on a
busy machine too). Run: `python benchmarks/merged_save.py [--small]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_common import BASES, llama_config, lora_model, proc_status, reset_peak, run_ranks  # noqa: E402

WORLD = 2
BACKENDS = ("fsdp2", "zero3")


def wrap(model, backend: str):
    import torch

    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}  # fmt: skip
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return deepspeed.initialize(model=model, optimizer=opt, config=config)[0]


def full_state(wrapped, backend: str) -> dict:
    if backend == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return wrapped._zero3_consolidated_16bit_state_dict()


def rank_main(backend: str, shape: dict, folder: Path, repeat: int) -> dict:
    import torch
    import torch.distributed as dist

    import shardsave

    if backend == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = llama_config(shape)
    model = lora_model(config, shape["rank"])
    with torch.no_grad():  # trained adapter values, the same on every rank
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    wrapped = wrap(model, backend)
    check = _time_the_check()

    def ours() -> None:
        shardsave.save_merged(wrapped, folder / "ours", max_shard_size="200MB")

    def today() -> None:
        state = full_state(wrapped, backend)
        if rank == 0:  # the cheapest CPU copy: built on the meta device, the gathered tensors assigned to it
            with torch.device("meta"):
                replica = lora_model(config, shape["rank"])
            replica.load_state_dict(state, strict=False, assign=True)
            del state
            replica.merge_and_unload().save_pretrained(str(folder / "theirs"), max_shard_size="200MB")

    out = {}
    for name, fn in (("ours", ours), ("today", today)):
        seconds = []
        for _ in range(repeat + 1):
            gc.collect()
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            seconds.append(time.perf_counter() - start)
        gc.collect()
        dist.barrier()
        before = reset_peak()
        fn()
        extra = proc_status("VmHWM") - before
        dist.barrier()
        out[name] = {"seconds": statistics.median(seconds[1:]), "extra_bytes": extra}
        if name == "ours":
            out["check_seconds"] = check["seconds"] / (repeat + 2)
            check["seconds"] = 0.0
    if rank == 0:
        names = sorted(p.name for p in (folder / "theirs").iterdir())
        same = names == sorted(p.name for p in (folder / "ours").iterdir()) and all(
            (folder / "ours" / n).read_bytes() == (folder / "theirs" / n).read_bytes() for n in names
        )
        out["same_files"] = same
    dist.barrier()
    dist.destroy_process_group()
    return out


def _time_the_check() -> dict:
    """Count the time save_merged spends proving its parallel write: the CRC-32 of every range as it is written,
    and the read-back (which computes its own)."""
    import zlib

    from shardsave.merged import parallel as merged_save  # where the parallel write checks its ranges

    spent = {"seconds": 0.0, "inside": False}
    crc, read_back = zlib.crc32, merged_save._read_back

    def timed_crc(*args):
        start = time.perf_counter()
        try:
            return crc(*args)
        finally:
            if not spent["inside"]:
                spent["seconds"] += time.perf_counter() - start

    def timed_read_back(*args):
        start, spent["inside"] = time.perf_counter(), True
        try:
            return read_back(*args)
        finally:
            spent["inside"] = False
            spent["seconds"] += time.perf_counter() - start

    merged_save.zlib.crc32, merged_save._read_back = timed_crc, timed_read_back
    return spent


def run(backend: str, shape: dict, folder: Path, repeat: int) -> list[dict]:
    return run_ranks(HERE, ["--child", backend, json.dumps(shape), str(folder), str(repeat)], WORLD, backend)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        backend, shape, folder, repeat = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(rank_main(backend, shape, folder, repeat)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny base: a smoke run, not the goal's size")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    name, shape = BASES["smoke" if args.small else "default"][0]
    print(f"base {name}: {shape}, {WORLD} gloo ranks, median of {args.repeat} calls after a warm-up")
    print(f"{'backend':8} {'ours s':>8} {'check s':>8} {'today s':>8} {'speed-up':>9} {'ours MiB':>9} {'today MiB':>10}"
          f" same files")  # fmt: skip
    for backend in args.backends.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"merged-{backend}-"))
        try:
            ranks = run(backend, shape, folder, args.repeat)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        r0 = ranks[0]
        ours, today = r0["ours"], r0["today"]
        ratio = today["seconds"] / ours["seconds"]
        print(
            f"{backend:8} {ours['seconds']:8.2f} {r0['check_seconds']:8.2f} {today['seconds']:8.2f} {ratio:8.1f}x "
            f"{ours['extra_bytes'] / 2**20:9.0f} {today['extra_bytes'] / 2**20:10.0f} {r0['same_files']}"
        )
    print("goal: >= 5x faster; rank 0's extra memory <= its shard + max(largest tensor, 256 MiB)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
