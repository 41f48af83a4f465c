"""Multi-rank scenarios that write the DCP and DeepSpeed checkpoints the format readers read
(tests/formats/test_dcp.py, tests/formats/test_deepspeed.py)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from scenario_tools import lora_model
from workers import scenario

import shardsave


@scenario
def dcp_save(rank, world, out: Path, params):
    """FSDP2 training step, then the model saved with DCP as plain FQNs (`dcp/`), as accelerate writes it, with
    the optimizer (`pytorch_model_fsdp_0/`, keys under `model.` and `optim.`), and adapter-only under wrapper
    prefixes (`dcp_adapter/`); `out` is laid out as Trainer's checkpoint-N (adapter config, a broken
    adapter_model.safetensors); shardsave.save_pretrained of the live model in `reference/`, the base model's
    config in `base/`; rank 0 keeps the full adapter tensors gathered natively for the comparison."""
    import torch.distributed.checkpoint as dcp
    from backends import full_state, train, wrap
    from tiny import llama_config
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model = lora_model(params)
    wrapped, opt = wrap(model, "fsdp2")
    train(wrapped, opt, "fsdp2", rank)
    dcp.save(get_model_state_dict(wrapped), checkpoint_id=str(out / "dcp"))
    model_sd, optim_sd = get_state_dict(wrapped, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "pytorch_model_fsdp_0"))
    # adapter-only, under every wrapper component a user's own state dict may carry
    adapter = {
        "module._orig_mod." + re.sub(r"(layers\.\d+)\.", r"\1._fsdp_wrapped_module._checkpoint_wrapped_module.", k): v
        for k, v in model_sd.items()
        if "lora_" in k
    }
    dcp.save(adapter, checkpoint_id=str(out / "dcp_adapter"))
    shardsave.save_pretrained(wrapped, out / "reference")
    # FSDP1 SHARDED_STATE_DICT of another model, with its own reference
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    fsdp1, opt1 = wrap(lora_model(params, seed=3), "fsdp1_flat")
    train(fsdp1, opt1, "fsdp1_flat", rank)
    with FSDP.state_dict_type(fsdp1, StateDictType.SHARDED_STATE_DICT):
        dcp.save({"model": fsdp1.state_dict()}, checkpoint_id=str(out / "fsdp1"))
    shardsave.save_pretrained(fsdp1, out / "reference_fsdp1")
    state = full_state(wrapped, "fsdp2")
    if rank == 0:
        torch.save({k: v for k, v in state.items() if "lora_" in k}, out / "lora.pt")
        model.peft_config["default"].save_pretrained(str(out))
        (out / "adapter_model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      ")  # the broken one
        llama_config(**params.get("model", {})).save_pretrained(str(out / "base"))
    return {}


@scenario
def deepspeed_save(rank, world, out: Path, params):
    """For each of `params["runs"]` ({name, stage, bf16, exclude_frozen, model, lora}): DeepSpeed ZeRO training
    steps, then `engine.save_checkpoint(out / name)` and shardsave.save_pretrained (`out / name / "reference"`);
    rank 0 keeps the trainable parameters gathered natively (`out / name / "lora.pt"`) for the comparison, and
    writes the adapter config into `out / name` and the base model's config into `out / name / "base"`. Several
    engines in one run save the start-up time."""
    import deepspeed
    from backends import full_state, train
    from tiny import llama_config

    for run in params["runs"]:
        model = lora_model({**params, "model": run.get("model", {}), "lora": run.get("lora", params["lora"])})
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": run["stage"], "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": bool(run.get("bf16"))},
        }
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        train(engine, None, "zero", rank)
        folder = out / run["name"]
        engine.save_checkpoint(str(folder), exclude_frozen_parameters=bool(run.get("exclude_frozen")))
        shardsave.save_pretrained(engine, folder / "reference")
        state = full_state(engine, "zero")
        if rank == 0:
            torch.save({k: v for k, v in state.items() if "lora_" in k}, folder / "lora.pt")
            model.peft_config["default"].save_pretrained(str(folder))  # as Trainer writes it beside the checkpoint
            llama_config(**run.get("model", {})).save_pretrained(str(folder / "base"))
        engine.destroy()
    return {}
