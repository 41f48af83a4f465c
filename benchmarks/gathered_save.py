"""Benchmark: a gathered adapter save under FSDP2, FSDP1 or ZeRO-3, against what users do today.

    torchrun --standalone --nproc_per_node 2 benchmarks/gathered_save.py --backend fsdp2
    torchrun --standalone --nproc_per_node 2 benchmarks/gathered_save.py --backend fsdp1
    torchrun --standalone --nproc_per_node 2 benchmarks/gathered_save.py --backend zero3
    (--hidden 1024 --layers 16 --vocab 16000: a Llama-shaped model of about 240M parameters; --rank 16 on
    q_proj/v_proj is about 3 MiB of adapter in fp32)

Measured in the same run: wall time (median of --repeat, every rank done), then in a separate call rank 0's
peak extra resident memory (sampled every millisecond in a thread, relative to just before the call; the
sampler is kept out of the timed calls, where it competed for the GIL). The script re-executes itself with
MALLOC_MMAP_THRESHOLD_ fixed, so that every large buffer is a fresh mapping and shows in the resident size
(glibc otherwise recycles freed heap, and what a call allocates depends on what ran before it).
- shardsave:   shardsave.save_pretrained(model, dir)
- full+filter: the full-state-dict path accelerate / Trainer take, then PEFT's save of the LoRA keys
               (FSDP2 get_model_state_dict(full_state_dict, cpu_offload); FSDP1 FULL_STATE_DICT;
               ZeRO-3 the engine's consolidated 16-bit state dict)
- native:      the best adapter-only alternative (FSDP2 get_model_state_dict(ignore_frozen_params=True);
               ZeRO-3 GatheredParameters over the LoRA parameters; none for FSDP1)
- peft:        PEFT's own single-process save of the same, already gathered adapter on rank 0
               (`PeftModel.save_pretrained(dir, state_dict=gathered)`: card, config, weights; no fsync)
- floor:       safetensors.torch.save_file of the same gathered tensors, one process
- floor+fsync: the same, then fsync of the file (shardsave makes its files durable before publishing)

--paths picks a subset; --json writes the results for benchmarks/model_size.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shardsave  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled in a thread."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def measure(fn, repeat: int) -> tuple[float, int]:
    """(median seconds over `repeat` calls after a warm-up, peak extra bytes of one more call)."""
    times = []
    for _ in range(repeat + 1):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - start)
    dist.barrier()
    with PeakRSS() as mem:
        fn()
        dist.barrier()
    return statistics.median(times[1:]), mem.extra


def reexec_with_fixed_mmap_threshold() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        os.execv(sys.executable, [sys.executable, *sys.argv])


PATHS = ("shardsave", "full+filter", "native", "peft", "floor", "floor+fsync")


def build(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, vocab_size=args.vocab,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=args.rank, target_modules=args.targets.split(",")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["fsdp2", "fsdp1", "zero3"], required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    parser.add_argument("--json", type=Path, help="write the results here (rank 0)")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="time with glibc's default (dynamic) mmap threshold, as a training process runs: buffers are then "
        "reused from the heap instead of being mapped and faulted in afresh each save (memory figures are "
        "then unreliable)",
    )
    args = parser.parse_args()
    paths = args.paths.split(",")
    if not args.default_malloc:
        reexec_with_fixed_mmap_threshold()

    if args.backend == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if args.backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    elif args.backend == "fsdp1":
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True,
                       auto_wrap_policy=fsdp_auto_wrap_policy(model))  # fmt: skip
    else:
        import deepspeed

        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        wrapped, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})  # fmt: skip

    tmp = Path(tempfile.gettempdir()) / f"shardsave-bench-{os.environ.get('MASTER_PORT', '0')}"  # same on all ranks
    results = {}

    results["shardsave"] = measure(lambda: shardsave.save_pretrained(wrapped, tmp / "ours"), args.repeat)
    adapter_bytes = (tmp / "ours" / "adapter_model.safetensors").stat().st_size if rank == 0 else 0
    n_adapter = len(lora_names)

    def peft_save(state):
        if rank == 0:
            from peft import get_peft_model_state_dict

            inner = model
            sd = {k: v for k, v in state.items() if "lora_" in k}
            get_peft_model_state_dict(inner, state_dict=sd)
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "full.safetensors"))

    if args.backend == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        def full():
            peft_save(get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))

        def native():
            options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
            state = get_model_state_dict(wrapped, options=options)
            peft_save(state)
    elif args.backend == "fsdp1":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType

        def full():
            with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):  # fmt: skip
                peft_save(wrapped.state_dict())

        native = None
    else:
        import deepspeed

        def full():
            peft_save(wrapped._zero3_consolidated_16bit_state_dict())

        lora_params = [p for n, p in wrapped.module.named_parameters() if p.requires_grad]

        def native():
            with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None):
                state = {n: p.detach().clone() for n, p in wrapped.module.named_parameters() if p.requires_grad}
            peft_save(state)

    if "full+filter" in paths:
        results["full+filter"] = measure(full, args.repeat)
    if native is not None and "native" in paths:
        results["native"] = measure(native, args.repeat)

    gathered = shardsave.gather_state_dict(wrapped)

    def floor(sync: bool):
        if rank == 0:
            from safetensors.torch import save_file

            path = tmp / "floor.safetensors"
            save_file(gathered, str(path), metadata={"format": "pt"})
            if sync:
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)

    def peft_own():
        if rank == 0:
            model.save_pretrained(str(tmp / "peft"), state_dict=gathered)

    if "peft" in paths:
        results["peft"] = measure(peft_own, args.repeat)
    if "floor" in paths:
        results["floor"] = measure(lambda: floor(False), args.repeat)
    if "floor+fsync" in paths:
        results["floor+fsync"] = measure(lambda: floor(True), args.repeat)

    if rank == 0:
        ours_t, ours_m = results["shardsave"]
        print(f"\n{args.backend}: {n_params / 1e6:.0f}M parameters, adapter {adapter_bytes / 2**20:.2f} MiB "
              f"({n_adapter} tensors), 2 ranks, {dist.get_backend()}, median of {args.repeat}")  # fmt: skip
        print(f"{'path':12} {'time':>9} {'rank-0 extra':>13}  {'shardsave is':>17}  {'extra / adapter':>15}")
        for name, (t, m) in results.items():
            if name == "shardsave":
                speed = ""
            elif name.startswith("floor") or name == "peft":
                speed = f"{ours_t / t:6.2f}x the {name}"
            else:
                speed = f"{t / ours_t:8.1f}x faster"
            print(f"{name:12} {t * 1e3:7.1f}ms {m / 2**20:10.1f}MiB  {speed:>17}  {m / max(adapter_bytes, 1):14.1f}x")
        if args.json:
            import json

            args.json.write_text(json.dumps({
                "backend": args.backend, "params": n_params, "adapter_bytes": adapter_bytes, "tensors": n_adapter,
                "results": {k: {"seconds": t, "extra_bytes": m} for k, (t, m) in results.items()},
            }))  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
