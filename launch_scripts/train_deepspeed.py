"""DeepSpeed ZeRO-2 or ZeRO-3 LoRA training with the `deepspeed` launcher, saved with shardsave (gathered,
and shards + merge).

    deepspeed --num_gpus 2 launch_scripts/train_deepspeed.py --deepspeed_config configs/ds_zero3.json
    deepspeed --num_gpus 2 launch_scripts/train_deepspeed.py --deepspeed_config configs/ds_zero2.json

On a machine without GPUs DeepSpeed picks its CPU accelerator and the gloo backend (`--num_gpus` then counts
CPU ranks). `configs/ds_zero3.json` sets `stage3_param_persistence_threshold: 0`, so even the small LoRA
tensors are really partitioned.
"""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import torch
from common import device, lora_model, parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--deepspeed_config", type=Path, required=True)
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = p.parse_args()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank()
    dev = device()
    model = lora_model(args.lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=json.loads(args.deepspeed_config.read_text()))
    run(engine, args.out, rank, dev, args.steps, backward=engine.backward, step=engine.step, resume_from=args.resume)


if __name__ == "__main__":
    main()
