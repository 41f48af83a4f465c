"""FSDP2 (`fully_shard`) LoRA training with torchrun, saved with shardsave (gathered, and shards + merge).

    torchrun --standalone --nproc_per_node 2 launch_scripts/train_fsdp2.py [--out demo_output] [--steps 3]

CPU with gloo by default, one GPU per rank with NCCL when CUDA is present. Prints whether PEFT loads both
saved adapters and reproduces the trained (sharded) model's logits.
"""

from __future__ import annotations

from common import device, init_distributed, lora_model, parser, run
from torch.distributed.fsdp import fully_shard


def main() -> None:
    args = parser(__doc__).parse_args()
    rank, _ = init_distributed()
    dev = device()
    model = lora_model(args.lora).to(dev)
    for layer in model.base_model.model.model.layers:  # one FSDP unit per decoder layer, plus the root
        fully_shard(layer)
    fully_shard(model)
    run(model, args.out, rank, dev, args.steps, resume_from=args.resume)


if __name__ == "__main__":
    main()
