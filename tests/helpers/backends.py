"""Wrap a tiny PEFT model the way each training backend does, train it a little, and get reference
weights the backend's own (expensive) way — used by the multi-rank tests."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from shardsave.plan.names import canonical_name


def decoder_layer_cls():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return LlamaDecoderLayer


def apply_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    layer = decoder_layer_cls()
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer))


def wrap(model, backend: str, *, checkpointing: bool = False, compile: bool = False, device: str = "cpu"):
    """Returns (trainable object to call, optimizer-step function)."""
    if device == "cuda":
        torch.cuda.set_device(dist.get_rank())
        model.to("cuda")
    if checkpointing:
        apply_checkpointing(model)
    params = None
    if backend == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    elif backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    elif backend in ("fsdp1", "fsdp1_flat"):
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(
            model,
            device_id=torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu"),
            use_orig_params=(backend == "fsdp1"),
            auto_wrap_policy=fsdp_auto_wrap_policy(model),
        )
    elif backend.startswith("zero"):
        import deepspeed

        stage = int(backend[4])  # "zero3", or "zero3_persist": DeepSpeed's default persistence threshold
        zero = (
            {"stage": stage}
            if backend.endswith("_persist")
            else {"stage": stage, "stage3_param_persistence_threshold": 0}
        )
        config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True, "zero_optimization": zero}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        wrapped = engine
    else:
        raise ValueError(backend)
    if compile:
        wrapped = torch.compile(wrapped, backend="eager")
    if backend.startswith("zero"):
        return wrapped, None
    params = [p for p in wrapped.parameters() if p.requires_grad]
    return wrapped, torch.optim.SGD(params, lr=0.1)


def train(wrapped, opt, backend: str, rank: int, steps: int = 2) -> None:
    gen = torch.Generator().manual_seed(100 + rank)
    wrapped.train()
    for _ in range(steps):
        ids = torch.randint(1, 90, (2, 8), generator=gen).to(next(iter(wrapped.parameters())).device)
        loss = wrapped(input_ids=ids, labels=ids).loss
        if backend.startswith("zero"):
            engine = getattr(wrapped, "_orig_mod", wrapped)
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()
    wrapped.eval()


def sharded_logits(wrapped) -> torch.Tensor:
    """Logits of the sharded model itself (every rank must take part)."""
    from tiny import logits

    return logits(wrapped)


def full_state(wrapped, backend: str) -> dict[str, torch.Tensor]:
    """Every parameter and buffer in full, gathered the backend's own way, on every rank."""
    if backend == "fsdp2":
        from torch.distributed.tensor import DTensor

        # from the parameters themselves: under accelerate's FSDP2, state_dict() returned stale values
        from shardsave.ranks.collect.walk import state_entries

        module = getattr(wrapped, "_orig_mod", wrapped)
        return {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v, _ in state_entries(module)
        }
    if backend in ("fsdp1", "fsdp1_flat"):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        inner = getattr(wrapped, "_orig_mod", wrapped)
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        FSDP.set_state_dict_type(inner, StateDictType.FULL_STATE_DICT, cfg)
        return {canonical_name(k): v.detach().cpu().clone() for k, v in inner.state_dict().items()}
    if backend.startswith("zero"):
        import deepspeed

        module = getattr(wrapped, "_orig_mod", wrapped).module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {canonical_name(k): v.detach().clone() for k, v in module.state_dict().items()}
    module = getattr(wrapped, "_orig_mod", wrapped)
    module = getattr(module, "module", module)
    return {canonical_name(k): v.detach().clone() for k, v in module.state_dict().items()}


def world_barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
