"""Hooks for where users already are: a `transformers.TrainerCallback` and an `accelerate` helper.

transformers comes with PEFT; accelerate stays optional (the helper only uses the object it is given).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from .save import save_pretrained
from .shards import save_shards

__all__ = ["ShardSaveCallback", "save_with_accelerator", "main_process_of"]


def main_process_of(accelerator) -> bool | None:
    """`accelerator.is_main_process` as shardsave's `is_main_process`, or None (rank 0 writes) when accelerate
    counts fewer processes than torch.distributed (it does with DeepSpeed on CPU, where every rank then
    reports being the main process)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return accelerator.is_main_process if accelerator.num_processes == world else None


def save_with_accelerator(accelerator, model, save_directory, **kwargs) -> None:
    """`shardsave.save_pretrained` with the writer chosen by `accelerator` (see `main_process_of`); call it
    on every process."""
    save_pretrained(model, save_directory, is_main_process=main_process_of(accelerator), **kwargs)


class ShardSaveCallback(TrainerCallback):
    """Writes a correct adapter into every `checkpoint-N/` that Trainer saves.

    Under FSDP or ZeRO-3, Trainer's own save of a PEFT model writes an empty or full-model adapter, or gathers
    the whole model to write it. This callback runs on every rank after Trainer's save and replaces the adapter
    files in the checkpoint (atomically; optimizer and trainer state are kept) with what
    `PeftModel.save_pretrained` writes for the same weights, moving only the adapter. With `shards=True` each
    rank writes its shard into `checkpoint-N/adapter_shards/` instead (`python -m shardsave.merge` later).
    """

    def __init__(self, *, shards: bool = False, timeout: float | None = None, **save_kwargs):
        self.shards = shards
        self.timeout = timeout
        self.save_kwargs = save_kwargs

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.shards:
            options = {k: v for k, v in self.save_kwargs.items() if k in ("selected_adapters", "save_embedding_layers")}
            save_shards(model, checkpoint / "adapter_shards", timeout=self.timeout, **options)
        else:
            save_pretrained(model, checkpoint, timeout=self.timeout, **self.save_kwargs)
        return control
