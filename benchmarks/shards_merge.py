"""Benchmark: per-rank shards, then the offline merge, against the gathered save and a plain copy.

    torchrun --standalone --nproc_per_node 2 benchmarks/shards_merge.py
    torchrun --standalone --nproc_per_node 2 benchmarks/shards_merge.py --rank 64 --targets all

FSDP2 on 2 ranks (gloo on CPU, NCCL-free), Llama-shaped model (the same flags as gathered_save.py). In one run:
- save_shards: shardsave.save_shards(model, dir), slowest rank's wall time, and each rank's own time;
- gathered:    shardsave.save_pretrained(model, dir), for comparison;
- merge:       shardsave.merge_shards(shards, out, overwrite=True) in one process (validation, checksums,
               streaming write, fsync, atomic publish);
- copy:        shutil.copyfile of the same shard files into a fresh directory (the bytes a merge reads),
  copy+fsync:  the same, then fsync of each copy (a merge makes its output durable).
Median of --repeat after a warm-up. `python -m shardsave.merge` adds the interpreter start (torch import),
timed once at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gathered_save import build  # noqa: E402

import shardsave  # noqa: E402

ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def timed(fn, repeat: int, *, everyone: bool = True) -> tuple[float, float]:
    """(median of the slowest rank's wall time, median of this rank's own time)."""
    walls, own = [], []
    for _ in range(repeat + 1):
        if everyone:
            dist.barrier()
        start = time.perf_counter()
        fn()
        own.append(time.perf_counter() - start)
        if everyone:
            dist.barrier()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls[1:]), statistics.median(own[1:])


def copy_files(files: list[Path], out: Path, sync: bool) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for src in files:
        dst = out / src.name
        shutil.copyfile(src, dst)
        if sync:
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated, or 'all' (every linear)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.targets == "all":
        args.targets = ALL

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    tmp = Path(tempfile.gettempdir()) / f"shardsave-bench-merge-{os.environ.get('MASTER_PORT', '0')}"
    shards, merged = tmp / "shards", tmp / "merged"
    shard_wall, shard_own = timed(lambda: shardsave.save_shards(model, shards), args.repeat)
    gathered, _ = timed(lambda: shardsave.save_pretrained(model, tmp / "gathered"), args.repeat)
    owns = [None] * dist.get_world_size()
    dist.all_gather_object(owns, shard_own)

    if rank == 0:
        files = sorted(p for p in shards.iterdir() if p.is_file())
        shard_bytes = sum(p.stat().st_size for p in files)
        adapter_bytes = (tmp / "gathered" / "adapter_model.safetensors").stat().st_size
        merge, _ = timed(lambda: shardsave.merge_shards(shards, merged, overwrite=True), args.repeat, everyone=False)
        copy, _ = timed(lambda: copy_files(files, tmp / "copy", False), args.repeat, everyone=False)
        copy_sync, _ = timed(lambda: copy_files(files, tmp / "copy", True), args.repeat, everyone=False)
        identical = (merged / "adapter_model.safetensors").read_bytes() == (
            tmp / "gathered" / "adapter_model.safetensors"
        ).read_bytes()
        start = time.perf_counter()
        cli = [sys.executable, "-m", "shardsave.merge", str(shards), "-o", str(tmp / "cli"), "--overwrite"]
        subprocess.run(cli, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(Path.cwd())))
        cli_time = time.perf_counter() - start

        print(f"\nFSDP2, {n_params / 1e6:.0f}M parameters, adapter {adapter_bytes / 2**20:.2f} MiB, 2 ranks, gloo, "
              f"median of {args.repeat}; {len(files)} shard files, {shard_bytes / 2**20:.2f} MiB")  # fmt: skip
        print(f"save_shards   {shard_wall * 1e3:8.1f} ms  (per rank: "
              f"{', '.join(f'{t * 1e3:.1f}' for t in owns)} ms)  vs gathered save {gathered * 1e3:.1f} ms")  # fmt: skip
        print(f"merge         {merge * 1e3:8.1f} ms  = {merge / copy:.2f}x the copy, "
              f"{merge / copy_sync:.2f}x copy+fsync  (output identical to the gathered save: {identical})")  # fmt: skip
        print(f"copy          {copy * 1e3:8.1f} ms")
        print(f"copy+fsync    {copy_sync * 1e3:8.1f} ms")
        print(f"merge CLI     {cli_time * 1e3:8.1f} ms  (once, including the interpreter and torch import)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
