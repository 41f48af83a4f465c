"""Multi-rank scenarios of the rescue: the FSDP checkpoints accelerate (and so Trainer) writes, and Trainer's
DeepSpeed ZeRO-3 checkpoints (`trainer_zero3`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from scenario_tools import lora_model, trainer_on_save
from workers import scenario

import shardsave

#: The adapter of these checkpoints: LoRA on q/v plus a modules_to_save head, as in issue #23's FSDP1 report.
LORA = {"target_modules": ["q_proj", "v_proj"], "r": 4, "modules_to_save": ["lm_head"]}


@scenario
def accelerate_fsdp_save(rank, world, out: Path, params):
    """FSDP1 (`use_orig_params=True`, PEFT's auto-wrap policy) or FSDP2 training steps, then every model file
    accelerate's own `save_fsdp_model(..., adapter_only=True)` writes, as Trainer calls it:
    SHARDED_STATE_DICT into `run/checkpoint-3/pytorch_model_fsdp_0/` (with `save_fsdp_optimizer`'s
    `optimizer_0/`, and the adapter ShardSaveCallback wrote there, plain and as shards), SHARDED with
    `use_dcp=False` (`per_rank/pytorch_model_fsdp_0_rank{N}.bin`) and FULL_STATE_DICT
    (`full/pytorch_model_fsdp.bin`). Each folder gets the adapter config; `reference/` is shardsave.save_pretrained
    of the live model, `base/` the base model's config, `lora.pt` the adapter's tensors gathered natively."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import save_fsdp_model, save_fsdp_optimizer
    from backends import full_state, train, wrap
    from tiny import llama_config

    version = int(params["fsdp_version"])
    backend = "fsdp2" if version == 2 else "fsdp1"
    model = lora_model({"lora": LORA})
    # loaded from out/base, as a real run names its base: the README's recipe then needs no --base
    inner = model.get_base_model()
    inner.name_or_path = inner.config._name_or_path = str(out / "base")
    model.peft_config["default"].base_model_name_or_path = str(out / "base")
    wrapped, opt = wrap(model, backend)
    train(wrapped, opt, backend, rank)
    checkpoint = out / "run" / "checkpoint-3"
    trainer_on_save(model, rank, out, {})  # Trainer's checkpoint-3/ with what ShardSaveCallback writes
    # accelerate enables FSDP only on accelerators; its save functions read only these objects' fields, so a
    # CPU Accelerator (on the process group already set up; made after TrainingArguments, which resets
    # accelerate's state) and a plugin stand as Trainer's
    accelerator = Accelerator(cpu=True)
    assert (accelerator.process_index, accelerator.num_processes) == (rank, world), accelerator.state
    plugin = FullyShardedDataParallelPlugin(fsdp_version=version, state_dict_type="SHARDED_STATE_DICT")
    save_fsdp_model(plugin, accelerator, wrapped, str(checkpoint), adapter_only=True)
    save_fsdp_optimizer(plugin, accelerator, opt, wrapped, str(checkpoint))
    save_fsdp_model(plugin, accelerator, wrapped, str(out / "per_rank"), adapter_only=True, use_dcp=False)
    if version == 2:  # FSDP1: accelerate sets offload_to_cpu=True on >1 process, which segfaults on CPU
        full = FullyShardedDataParallelPlugin(fsdp_version=version, state_dict_type="FULL_STATE_DICT")
        save_fsdp_model(full, accelerator, wrapped, str(out / "full"), adapter_only=True)
    shardsave.save_pretrained(wrapped, out / "reference")
    if version == 1:  # a LoRA without modules_to_save: accelerate's FSDP1 save then holds no tensor at all
        lora_only, _ = wrap(lora_model({"lora": {**LORA, "modules_to_save": None}}), backend)
        save_fsdp_model(plugin, accelerator, lora_only, str(out / "lora_only"), adapter_only=True)
        if rank == 0:
            lora_only.peft_config["default"].save_pretrained(str(out / "lora_only"))
    state = full_state(wrapped, backend)
    if rank == 0:
        torch.save({k: v for k, v in state.items() if "lora_" in k or "modules_to_save" in k}, out / "lora.pt")
        for folder in (checkpoint, out / "per_rank", out / "full")[: 3 if version == 2 else 2]:
            model.peft_config["default"].save_pretrained(str(folder))
        llama_config().save_pretrained(str(out / "base"))
    dist.barrier()
    return {"files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "result-" not in p.name)}


@scenario
def trainer_fsdp(rank, world, out: Path, params):
    """transformers.Trainer with FSDP2 trains a LoRA model and writes checkpoint-2/ (accelerate's FSDP state is
    forced on CPU, where accelerate enables FSDP only for accelerators; FSDP1 then fails in accelerate's prepare:
    "Inconsistent compute device and `device_id`: cpu vs cpu:0"); then shardsave.save_pretrained of the live
    model (`reference/`) and the base model's config (`base/`)."""
    import accelerate
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType
    from datasets_free import token_dataset
    from peft.utils.other import fsdp_auto_wrap_policy
    from tiny import llama_config
    from transformers import Trainer, TrainingArguments

    version = int(params.get("fsdp_version", 2))
    model = lora_model({"lora": LORA})
    inner = model.get_base_model()
    inner.name_or_path = inner.config._name_or_path = str(out / "base")
    model.peft_config["default"].base_model_name_or_path = str(out / "base")
    model.train()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=version,
        state_dict_type="SHARDED_STATE_DICT",
        auto_wrap_policy=fsdp_auto_wrap_policy(model) if version == 1 else "transformer_based_wrap",
        transformer_cls_names_to_wrap=None if version == 1 else ["LlamaDecoderLayer"],
        use_orig_params=True if version == 1 else None,
    )
    state = accelerate.Accelerator(fsdp_plugin=plugin, cpu=True).state
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    args = TrainingArguments(
        output_dir=str(out / "run"), max_steps=2, save_steps=2, per_device_train_batch_size=2, report_to=[],
        learning_rate=1e-2, accelerator_config={"use_configured_state": True},
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(rank))
    state = trainer.accelerator.state
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin  # Trainer's Accelerator reset it
    trainer.train()
    shardsave.save_pretrained(trainer.model_wrapped, out / "reference")
    if rank == 0:
        llama_config().save_pretrained(str(out / "base"))
    return {
        "fsdp": trainer.is_fsdp_enabled,
        "files": sorted(str(p.relative_to(out)) for p in (out / "run").rglob("*") if p.is_file()),
    }


@scenario
def trainer_zero3(rank, world, out: Path, params):
    """transformers.Trainer with DeepSpeed ZeRO-3 (through accelerate, gloo) trains a LoRA model and writes its
    checkpoint-N/ folders the way users get them; then shardsave.save_pretrained of the live model at the last
    step (`reference/`) and the base model's config (`base/`)."""
    import accelerate
    from datasets_free import token_dataset
    from peft import LoraConfig
    from tiny import llama_config, peft_model
    from transformers import Trainer, TrainingArguments

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    accelerate.PartialState(backend="gloo")
    model = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    model.train()
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    args = TrainingArguments(
        output_dir=str(out / "run"), max_steps=2, save_steps=2, per_device_train_batch_size=2, report_to=[],
        learning_rate=1e-2, deepspeed=config, accelerator_config={"use_configured_state": True},
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(rank))
    trainer.train()
    shardsave.save_pretrained(trainer.model_wrapped, out / "reference")
    if rank == 0:
        llama_config().save_pretrained(str(out / "base"))
    return {"checkpoints": sorted(p.name for p in (out / "run").glob("checkpoint-*"))}
