"""What the multi-rank scenarios share (tests/scenarios/): the tiny LoRA model of a scenario's params, PEFT's
reference save, an audit of the collectives called, Trainer's on_save without Trainer, and the teardown of a
DeepSpeed engine."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_object",
    "broadcast",
    "all_reduce",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "send",
    "recv",
    "all_to_all_single",
    "batch_isend_irecv",  # (isend / irecv themselves are not wrapped: P2POp checks their identity)
)


def _nbytes(args) -> int:
    """Bytes a collective call carries; for point-to-point batches, what this rank sends."""
    total = 0
    for a in args:
        if torch.is_tensor(a):
            total += a.numel() * a.element_size()
        elif isinstance(a, list):
            sends = [op.tensor for op in a if op.op is dist.distributed_c10d.isend]
            total += sum(t.numel() * t.element_size() for t in sends)
    return total


class CommAudit:
    """Records every torch.distributed collective (name, bytes) called while active."""

    def __enter__(self):
        self.calls, self._saved = [], {}
        for name in _COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def spy(*args, _name=name, _original=original, **kwargs):
                self.calls.append([_name, _nbytes(args)])
                return _original(*args, **kwargs)

            setattr(dist, name, spy)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def lora_model(params: dict, **kwargs):
    from peft import LoraConfig
    from tiny import peft_model

    lora = dict(params.get("lora", {"target_modules": ["q_proj", "v_proj"]}))
    return peft_model(LoraConfig(**lora), **params.get("model", {}), **kwargs)


def save_reference(lora, state: dict, out: Path, logits=None, model_kwargs: dict | None = None, **save_kwargs):
    """Rank 0's reference: PEFT's own save of the natively gathered weights (and the sharded logits)."""
    from tiny import peft_model

    reference = peft_model(lora, **(model_kwargs or {}))
    _, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected, unexpected[:5]
    reference.save_pretrained(str(out / "theirs"), **save_kwargs)
    if logits is not None:
        torch.save(logits, out / "logits.pt")


def trainer_on_save(model, rank: int, out: Path, save_kwargs: dict) -> None:
    """What Trainer does at a save step, minus Trainer (whose FSDP / ZeRO-3 setup needs accelerators): rank 0
    writes its own files into `checkpoint-3/`, then every rank runs the callbacks' `on_save` with the model
    Trainer hands to callbacks (the unwrapped one it was given). Rank 0 copies the adapter's files to `out/ours`."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from shardsave.integrations import ShardSaveCallback

    args = TrainingArguments(output_dir=str(out / "run"), use_cpu=True, report_to=[])
    state = TrainerState(global_step=3)
    checkpoint = out / "run" / "checkpoint-3"
    if rank == 0:
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        (checkpoint / "adapter_model.safetensors").write_bytes(b"Trainer's empty adapter")
    dist.barrier()
    for callback in (ShardSaveCallback(**save_kwargs), ShardSaveCallback(shards=True)):
        callback.on_save(args, state, TrainerControl(), model=model)
    if rank == 0:
        (out / "ours").mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
            shutil.copyfile(checkpoint / name, out / "ours" / name)


def destroy(wrapped) -> None:
    if hasattr(wrapped, "destroy"):  # a DeepSpeed engine
        wrapped.destroy()
