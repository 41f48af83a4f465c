"""Multi-rank scenarios of the agreement's call ids (issue 23, items 8 and 9): calls some ranks made alone, a
decision that fails with an unexpected error, and ShardSaveCallback's rank 0 arriving late."""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist
from scenario_tools import lora_model
from workers import scenario

import shardsave


def _attempt(steps: dict, name: str, call) -> None:
    """Run `call`, record its outcome and duration under `name`."""
    started = time.monotonic()
    try:
        call()
        steps[name] = {"ok": True}
    except Exception as exc:
        steps[name] = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
    steps[name]["elapsed"] = time.monotonic() - started


@scenario
def calls_recover(rank, world, out: Path, params):
    """Rank 0 alone calls save_pretrained and catches the error, then rank 1 alone; then rank 0's start decision
    fails with a RuntimeError; then every rank saves twice (FSDP2), and rank 0 writes PEFT's own save."""
    from backends import wrap

    import shardsave.ranks.handshake as handshake

    timeout = params["timeout"]
    wrapped, _ = wrap(lora_model(params), "fsdp2")
    steps: dict[str, dict] = {}
    for who in (0, 1):
        if rank == who:  # as under `if rank == 0:`
            _attempt(steps, f"alone{who}", lambda: shardsave.save_pretrained(wrapped, out / "lone", timeout=timeout))
        dist.barrier()

    original = handshake._decide_start
    if rank == 0:

        def broken(statuses):
            raise RuntimeError("rank 0's decision failed")

        handshake._decide_start = broken
    _attempt(steps, "decide", lambda: shardsave.save_pretrained(wrapped, out / "broken", timeout=3 * timeout))
    handshake._decide_start = original

    for n in (1, 2):
        _attempt(steps, f"save{n}", lambda n=n: shardsave.save_pretrained(wrapped, out / f"ours{n}", timeout=30))
    if rank == 0:
        lora_model(params).save_pretrained(str(out / "theirs"))  # the same seed: the same weights
    return {"steps": steps}


@scenario
def callback_rank0_late(rank, world, out: Path, params):
    """ShardSaveCallback where rank 0 reaches on_save 3 x timeout after the others (it deletes old checkpoints
    alone), keeping its heartbeat from on_step_end; then rank 1 alone calls on_save (rank 0 never comes)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from shardsave.integrations import ShardSaveCallback

    timeout = params["timeout"]
    model = lora_model(params)
    args = TrainingArguments(output_dir=str(out / "run"), use_cpu=True, report_to=[])
    state, control = TrainerState(global_step=3), TrainerControl(should_save=True)
    callback = ShardSaveCallback(timeout=timeout)
    steps: dict[str, dict] = {}
    dist.barrier()  # both ranks leave the training step together (model builds take different times)
    callback.on_step_end(args, state, control)

    def late_save():
        if rank == 0:
            time.sleep(3 * timeout)  # Trainer's rotate_checkpoints, trainer_state.json: rank 0 alone
            checkpoint = out / "run" / "checkpoint-3"
            checkpoint.mkdir(parents=True)
            (checkpoint / "trainer_state.json").write_text("{}")
            (checkpoint / "adapter_model.safetensors").write_bytes(b"Trainer's empty adapter")
        callback.on_save(args, state, control, model=model)

    _attempt(steps, "late", late_save)
    if rank == 1:
        _attempt(steps, "never", lambda: callback.on_save(args, TrainerState(global_step=4), control, model=model))
    dist.barrier()
    if rank == 0:
        model.save_pretrained(str(out / "theirs"))
    return {"steps": steps}
