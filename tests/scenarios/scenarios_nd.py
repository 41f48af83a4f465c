"""Multi-rank scenarios on 2 x 2 meshes of 4 ranks (HSDP, tensor parallel, FSDP1 hybrid, offload, ZeRO++ hpZ):
save, shards, merged save and load (tests/save/test_nd.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from scenario_tools import CommAudit, destroy, save_reference
from workers import scenario

import shardsave


def nd_wrap(model, layout: str):
    """Wrap `model` on a 2 x 2 mesh of 4 ranks: "hsdp" (FSDP2, Replicate x Shard), "tp" (tensor-parallel LoRA
    modules, then FSDP2 over the data-parallel sub-mesh), "fsdp1_hybrid" (FSDP1 HYBRID_SHARD), "hpz" (ZeRO-3 with
    ZeRO++'s hierarchical partitioning, secondary partitions of 2). Returns (model to call, optimizer or None)."""
    from torch.distributed.device_mesh import init_device_mesh

    layers = model.base_model.model.model.layers
    if layout == "hsdp":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    elif layout in ("tp", "tp_replicated_a"):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        for layer in layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                if layout == "tp":  # lora_A column-, lora_B row-parallel: no LoRA tensor replicated over "tp"
                    plan = {
                        "base_layer": ColwiseParallel(output_layouts=Replicate()),
                        "lora_A.default": ColwiseParallel(),
                        "lora_B.default": RowwiseParallel(),
                    }
                else:  # lora_A left whole on every tensor-parallel rank: its copies drift apart
                    plan = {n: ColwiseParallel(output_layouts=Replicate()) for n in ("base_layer", "lora_B.default")}
                parallelize_module(proj, mesh["tp"], plan)
        for layer in layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        wrapped = model
    elif layout == "fsdp1_hybrid":
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        wrapped = FSDP(
            model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=fsdp_auto_wrap_policy(model),
            sharding_strategy=ShardingStrategy.HYBRID_SHARD, device_mesh=init_device_mesh("cpu", (2, 2)),
        )  # fmt: skip
    elif layout == "fsdp2_offload":
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        for layer in layers:
            fully_shard(layer, offload_policy=CPUOffloadPolicy())
        fully_shard(model, offload_policy=CPUOffloadPolicy())
        wrapped = model
    elif layout == "fsdp1_offload":
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import CPUOffload
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(
            model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=fsdp_auto_wrap_policy(model),
            cpu_offload=CPUOffload(offload_params=True),
        )  # fmt: skip
    elif layout in ("hpz", "zero3_offload"):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        }
        if layout == "hpz":
            config["zero_optimization"]["zero_hpz_partition_size"] = 2
        else:
            config["zero_optimization"]["offload_param"] = {"device": "cpu"}
            config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            config["zero_force_ds_cpu_optimizer"] = False
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        return engine, None
    else:
        raise ValueError(layout)
    return wrapped, torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)


@scenario
def nd_save(rank, world, out: Path, params):
    """For each of `params["layouts"]` (`nd_wrap`) on 4 ranks: train, save with save_pretrained and save_shards,
    then load the save into a fresh model under the same layout; rank 0 writes PEFT's save of the weights
    gathered natively and the logits (trained, and after the load). A save that raises is recorded per rank
    in `<layout>/error-<rank>.txt`."""
    from backends import train
    from peft import LoraConfig
    from tiny import logits, peft_model, randomize_trainable

    lora = LoraConfig(**params.get("lora", {"target_modules": ["q_proj", "v_proj"]}))
    for layout in params["layouts"]:
        folder = out / layout
        folder.mkdir(exist_ok=True)
        model = peft_model(lora)
        wrapped, opt = nd_wrap(model, layout)
        train(wrapped, opt, _train_kind(layout), rank)
        try:
            with CommAudit() as audit:
                shardsave.save_pretrained(wrapped, folder / "ours")
            (folder / f"sent-{rank}.json").write_text(json.dumps(sum(n for _, n in audit.calls)))
            (folder / f"calls-{rank}.json").write_text(json.dumps([name for name, _ in audit.calls]))
        except Exception as exc:
            (folder / f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
            destroy(wrapped)
            continue
        shardsave.save_shards(wrapped, folder / "shards")
        shardsave.save_merged(wrapped, folder / "merged", max_shard_size="40KB")
        state = _nd_full_state(wrapped, model, layout)
        trained = logits(wrapped)
        fresh = peft_model(lora)
        randomize_trainable(fresh, seed=9)
        loaded, loaded_opt = nd_wrap(fresh, layout)
        shardsave.load_pretrained(loaded, folder / "ours")
        after_load = logits(loaded)
        for group in (loaded_opt or loaded.optimizer).param_groups:  # an lr=0 step keeps the loaded weights
            group["lr"] = 0.0
        train(loaded, loaded_opt, _train_kind(layout), rank, steps=1)
        after_step = logits(loaded)
        if rank == 0:
            save_reference(lora, state, folder, trained)
            torch.save({"load": after_load, "step": after_step}, folder / "after_load.pt")
            reference = peft_model(lora)
            reference.load_state_dict(state, strict=False)
            reference.merge_and_unload().save_pretrained(str(folder / "merged_theirs"), max_shard_size="40KB")
        destroy(wrapped)
        destroy(loaded)
    return {}


def _train_kind(layout: str) -> str:
    return "zero3" if layout in ("hpz", "zero3_offload") else layout


def _nd_full_state(wrapped, model, layout: str) -> dict[str, torch.Tensor]:

    if layout in ("hsdp", "tp", "tp_replicated_a", "fsdp2_offload"):
        from torch.distributed.tensor import DTensor

        from shardsave.ranks.collect.walk import state_entries

        return {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v, _ in state_entries(model)
        }
    from backends import full_state

    return full_state(wrapped, "fsdp1" if layout.startswith("fsdp1") else "zero3")
