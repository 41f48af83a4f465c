"""Multi-rank scenarios of the ranks layer (tests/ranks/): replicas that drift apart, and ZeRO-3 parameters
partitioned over a data-parallel group smaller than the world."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from scenario_tools import lora_model, save_reference
from workers import scenario

import shardsave


@scenario
def replicas_out_of_sync(rank, world, out: Path, params):
    """Whole parameters on each rank (no DDP), changed on rank 1 only."""
    model = lora_model(params)
    if rank == 1:
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_A" in n).add_(1.0)
    shardsave.save_shards(model, out / "shards")
    return {}


@scenario
def zero3_group_save(rank, world, out: Path, params):
    """ZeRO-3 with every parameter partitioned over a data-parallel group of `group` ranks (strided, as an inner
    dimension leaves them), the other ranks holding copies: train (replicas see the same batches, so the copies
    stay equal), save with shardsave; rank 0 writes PEFT's save of the natively gathered weights."""
    import deepspeed
    from backends import full_state
    from peft import LoraConfig
    from tiny import logits, peft_model

    stride = world // params["group"]
    if params.get("blocks"):  # consecutive blocks of ranks
        groups = [dist.new_group(list(range(k, k + params["group"]))) for k in range(0, world, params["group"])]
        group = groups[rank // params["group"]]
    else:  # the strided groups a data-parallel dimension leaves
        groups = [dist.new_group(list(range(j, world, stride))) for j in range(stride)]
        group = groups[rank % stride]
    lora = LoraConfig(**params["lora"])
    model = peft_model(lora)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, **params.get("zero", {})}
    config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True, "zero_optimization": zero}
    deepspeed.zero.Init(module=model, data_parallel_group=group, config_dict_or_path=config)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    gen = torch.Generator().manual_seed(100 + dist.get_rank(group))
    engine.train()
    for _ in range(2):
        ids = torch.randint(1, 90, (2, 8), generator=gen)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.eval()
    shardsave.save_pretrained(engine, out / "ours")
    shardsave.save_merged(engine, out / "merged", max_shard_size="40KB")
    torch_logits = logits(engine)
    state = full_state(engine, "zero3")
    if rank == 0:
        save_reference(lora, state, out, torch_logits)
        reference = peft_model(lora)
        reference.load_state_dict(state, strict=False)
        reference.merge_and_unload().save_pretrained(str(out / "merged_theirs"), max_shard_size="40KB")
    weight = next(p for n, p in model.named_parameters() if "lora_A" in n)
    return {"partition_ranks": dist.get_process_group_ranks(weight.ds_process_group)}
