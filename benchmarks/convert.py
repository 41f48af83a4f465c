"""Benchmark: PiSSA -> LoRA conversion plus the device-to-host copy, against the plain copy and PEFT's path.

    python benchmarks/convert.py [--hidden 1024] [--layers 8] [--rank 16] [--repeat 5]

Runs on CUDA when present (the conversion then happens on the GPU, in one Triton launch per dtype, before
the single device-to-host copy), on CPU otherwise. Prints median times and ratios measured in this run:
- copy:       the converted tensors' plain device-to-host copy (the floor);
- shardsave:  shardsave's conversion + copy (`to_host` with the initial adapter);
- peft:       PEFT's conversion as save_pretrained does it (initial adapter loaded into the live model, then
              a concatenation per tensor on the host), without the file writes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shardsave.formats.initial import read_initial_adapter  # noqa: E402
from shardsave.tensors.convert import convert_tensor  # noqa: E402
from shardsave.tensors.host import to_host  # noqa: E402


def median_time(fn, repeat: int, sync) -> float:
    times = []
    for _ in range(repeat + 1):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                         vocab_size=1024)  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj"], init_lora_weights="pissa_niter_4")  # fmt: skip
    model = get_peft_model(model, lora).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(tmp)
        initial = read_initial_adapter(tmp)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 1e-3)
        trained = get_peft_model_state_dict(model)
        converted_on_device = {k: convert_tensor(k, v, initial.get(k)) for k, v in trained.items()}
        nbytes = sum(t.numel() * t.element_size() for t in converted_on_device.values())

        def copy():
            for t in converted_on_device.values():
                t.to("cpu", copy=True)

        def ours():
            to_host(trained, initial)

        def peft_path():
            model.load_adapter(str(Path(tmp).parent), subfolder=Path(tmp).name, adapter_name="initial")
            try:
                model.base_model.subtract_mutated_init(
                    {k: v.cpu() for k, v in get_peft_model_state_dict(model).items()}, "initial", {}
                )
            finally:
                model.delete_adapter("initial")

        t_copy = median_time(copy, args.repeat, sync)
        t_ours = median_time(ours, args.repeat, sync)
        t_peft = median_time(peft_path, max(1, args.repeat // 2), sync)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}; {len(trained)} adapter tensors, {nbytes / 2**20:.1f} MiB converted, {args.dtype}")
    print(f"copy (floor)        {t_copy * 1e3:9.2f} ms")
    print(f"shardsave convert   {t_ours * 1e3:9.2f} ms   {t_ours / t_copy:5.2f}x the copy")
    print(f"PEFT's path         {t_peft * 1e3:9.2f} ms   shardsave is {t_peft / t_ours:5.1f}x faster")


if __name__ == "__main__":
    main()
