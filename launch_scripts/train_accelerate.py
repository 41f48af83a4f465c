"""LoRA training with `accelerate launch` (its FSDP or DeepSpeed plugin), saved with shardsave (gathered, and
shards + merge), choosing the writer with `accelerator.is_main_process`.

    accelerate launch --config_file configs/accelerate_fsdp2.yaml launch_scripts/train_accelerate.py
    accelerate launch --config_file configs/accelerate_fsdp1.yaml launch_scripts/train_accelerate.py
    accelerate launch --config_file configs/accelerate_deepspeed_zero3.yaml launch_scripts/train_accelerate.py

Needs GPUs: accelerate 1.15 enables FSDP and DeepSpeed only on accelerators; launched on a CPU-only machine
every process believes it is alone (`DistributedType.NO`, one process), so this script refuses to run there.
(The accelerate prepare() path itself is tested on CPU in tests/save/test_multirank_backends.py.) With DeepSpeed,
should accelerate count fewer processes than torch.distributed, the writer is left to shardsave (rank 0)
rather than `is_main_process`, which would then be true on every rank.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator
from common import lora_model, parser, run

from shardsave.integrations import main_process_of


def refuse_without_gpus() -> None:
    """Say once why this script does not run here, without a traceback. Rank 0 exits with status 2 and the
    others with 0, so the launcher reports one failed process (its own report follows; no rank's traceback)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            "train_accelerate.py: accelerate sees one process although WORLD_SIZE > 1: its FSDP / DeepSpeed plugins "
            "need GPUs. On CPU use launch_scripts/train_fsdp2.py, train_fsdp1.py (torchrun) or train_deepspeed.py "
            "(deepspeed launcher); see the README's launch table.",
            file=sys.stderr,
            flush=True,
        )
    sys.exit(2 if int(os.environ.get("RANK", "0")) == 0 else 0)


def main() -> None:
    args = parser(__doc__).parse_args()
    accelerator = Accelerator()
    if accelerator.num_processes == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        refuse_without_gpus()
    rank = torch.distributed.get_rank()
    model = lora_model(args.lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, opt = accelerator.prepare(model, opt)

    def step():
        opt.step()
        opt.zero_grad()

    run(model, args.out, rank, accelerator.device, args.steps, is_main_process=main_process_of(accelerator),
        backward=accelerator.backward, step=step, resume_from=args.resume)  # fmt: skip


if __name__ == "__main__":
    main()
