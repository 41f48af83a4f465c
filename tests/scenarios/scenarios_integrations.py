"""Multi-rank scenarios of the integrations (tests/save/test_multirank_backends.py, tests/integrations/):
accelerate's prepare(), transformers.Trainer with ShardSaveCallback, the callback without a checkpoint folder."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from scenario_tools import lora_model, save_reference
from workers import scenario

import shardsave


@scenario
def accelerate_save(rank, world, out: Path, params):
    """`accelerate`'s prepare() with its FSDP or DeepSpeed plugin; save the prepared model and the
    unwrapped one; rank 0 writes PEFT's save of the natively gathered weights."""
    from accelerate import Accelerator, DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from backends import full_state
    from peft import LoraConfig
    from tiny import peft_model

    kind = params["plugin"]
    lora = LoraConfig(**params.get("lora", {"target_modules": ["q_proj", "v_proj"]}))
    model = peft_model(lora)
    if kind.startswith("fsdp"):
        from peft.utils.other import fsdp_auto_wrap_policy

        version = 2 if kind == "fsdp2" else 1
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=version,
            auto_wrap_policy=fsdp_auto_wrap_policy(model) if version == 1 else "transformer_based_wrap",
            transformer_cls_names_to_wrap=None if version == 1 else ["LlamaDecoderLayer"],
            use_orig_params=True if version == 1 else None,
        )
        accelerator = Accelerator(fsdp_plugin=plugin, cpu=not torch.cuda.is_available())
        if accelerator.state.distributed_type.name == "MULTI_CPU":
            # accelerate only enables FSDP on accelerators; on CPU, force the same prepare() path
            from accelerate.utils import DistributedType

            accelerator.state.distributed_type = DistributedType.FSDP
            accelerator.state.fsdp_plugin = plugin
        backend = "fsdp2" if version == 2 else "fsdp1"
    else:
        plugin = DeepSpeedPlugin(
            hf_ds_config={
                "train_micro_batch_size_per_gpu": 2,
                "zero_allow_untested_optimizer": True,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            }
        )
        accelerator = Accelerator(deepspeed_plugin=plugin)
        backend = "zero3"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    prepared, opt = accelerator.prepare(model, opt)
    gen = torch.Generator().manual_seed(100 + rank)
    prepared.train()
    for _ in range(2):
        ids = torch.randint(1, 90, (2, 8), generator=gen)
        loss = prepared(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    prepared.eval()
    # on CPU, accelerate's DeepSpeed state believes it is alone (num_processes == 1, so every rank is "main")
    # while DeepSpeed runs 2 ranks; shardsave refuses two writers, so let it pick rank 0 there
    from shardsave.integrations import main_process_of

    main = main_process_of(accelerator)
    shardsave.save_pretrained(prepared, out / "ours", is_main_process=main)
    shardsave.save_pretrained(accelerator.unwrap_model(prepared), out / "ours_inner", is_main_process=main)
    from tiny import logits

    torch_logits = logits(prepared)
    state = full_state(prepared, backend)
    if rank == 0:
        save_reference(lora, state, out, torch_logits)
    return {"type": type(prepared).__name__}


@scenario
def trainer_callback(rank, world, out: Path, params):
    """transformers.Trainer on 2 ranks with ShardSaveCallback; rank 0 records the final model's logits."""
    from datasets_free import token_dataset
    from peft import LoraConfig
    from tiny import logits, peft_model
    from transformers import Trainer, TrainingArguments

    from shardsave.integrations import ShardSaveCallback

    model = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    model.train()
    args = TrainingArguments(
        output_dir=str(out / "run"), max_steps=2, save_steps=1, per_device_train_batch_size=2, use_cpu=True,
        report_to=[], logging_steps=1, learning_rate=1e-2,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(rank), callbacks=[ShardSaveCallback()])
    trainer.train()
    if rank == 0:
        torch.save(logits(model.eval()), out / "logits.pt")
    return {"checkpoints": sorted(p.name for p in (out / "run").glob("checkpoint-*"))}


@scenario
def callback_without_checkpoint(rank, world, out: Path, params):
    """ShardSaveCallback.on_save where Trainer's checkpoint folder is missing: every rank refuses at once."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from shardsave.integrations import ShardSaveCallback

    args = TrainingArguments(output_dir=str(out / "run"), use_cpu=True, report_to=[])
    model = lora_model(params)
    started = time.perf_counter()
    try:
        ShardSaveCallback(timeout=60).on_save(args, TrainerState(global_step=3), TrainerControl(), model=model)
    finally:
        (out / f"elapsed-{rank}").write_text(str(time.perf_counter() - started))
