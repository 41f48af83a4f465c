"""FSDP1 (`FullyShardedDataParallel`) LoRA training with torchrun, PEFT's auto-wrap policy, saved with
shardsave (gathered, and shards + merge).

    torchrun --standalone --nproc_per_node 2 launch_scripts/train_fsdp1.py [--use-orig-params] [--out demo_output]

CPU with gloo by default (`device_id=cpu`), one GPU per rank with NCCL when CUDA is present.
"""

from __future__ import annotations

from common import device, init_distributed, lora_model, parser, run
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--use-orig-params", action="store_true", help="FSDP1 use_orig_params=True")
    args = p.parse_args()
    rank, _ = init_distributed()
    dev = device()
    model = lora_model(args.lora).to(dev)
    wrapped = FSDP(model, device_id=dev, use_orig_params=args.use_orig_params,
                   auto_wrap_policy=fsdp_auto_wrap_policy(model))  # fmt: skip
    run(wrapped, args.out, rank, dev, args.steps, resume_from=args.resume)


if __name__ == "__main__":
    main()
