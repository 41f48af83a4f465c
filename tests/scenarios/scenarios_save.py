"""Multi-rank scenarios of `shardsave.save_pretrained` (tests/save/): who writes, calls some ranks skip,
arguments or adapters that differ between ranks, a writer that cannot write or allocate, relative paths per
node, and the backend matrix against PEFT's own save (`backend_save`, also run for save_shards)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from scenario_tools import CommAudit, lora_model, save_reference, trainer_on_save
from workers import scenario

import shardsave


@scenario
def writer_rank1(rank, world, out: Path, params):
    model = lora_model(params)
    shardsave.save_pretrained(model, out / "ours", is_main_process=(rank == 1))
    return {"exists_after_return": (out / "ours" / "adapter_model.safetensors").exists()}


@scenario
def only_rank0_calls(rank, world, out: Path, params):
    model = lora_model(params)
    if rank == 0:
        start = time.monotonic()
        try:
            op = params.get("op", "save_pretrained")
            if op == "gather_state_dict":
                shardsave.gather_state_dict(model, timeout=params["timeout"])
            else:
                getattr(shardsave, op)(model, out / "ours", timeout=params["timeout"])
        finally:
            (out / "elapsed").write_text(str(time.monotonic() - start))
    else:
        time.sleep(params["timeout"] + 5)  # alive, but never calls the save
    return {}


@scenario
def writer_fails(rank, world, out: Path, params):
    (out / "a_file").write_text("not a directory")
    model = lora_model(params)
    shardsave.save_pretrained(model, out / "a_file" / "adapter")
    return {}


@scenario
def writer_cannot_write(rank, world, out: Path, params):
    """A complete save, then the writer cannot write the next one: `full` (writes fail past 4 KiB, as on a
    full disk) or `unwritable` (a destination where nothing may be created)."""
    import resource

    model = lora_model(params)
    dest = out / "adapter"
    if params["how"] == "unwritable":
        dest = Path(f"/sys/shardsave-test-{out.name}/adapter")  # sysfs: mkdir fails, even for root
    else:
        shardsave.save_pretrained(model, dest)
        dist.barrier()
        if rank == 0:
            shutil.copytree(dest, out / "previous")
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        shardsave.save_pretrained(lora_model(params, seed=7), dest)
    finally:
        if params["how"] == "full" and rank == 0:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    return {}


@scenario
def two_writers(rank, world, out: Path, params):
    model = lora_model(params)
    shardsave.save_pretrained(model, out / "ours", is_main_process=True)
    return {}


@scenario
def mismatched_args(rank, world, out: Path, params):
    model = lora_model(params)
    shardsave.save_pretrained(model, out / f"ours-{rank}")
    return {}


@scenario
def save_inside_unshard(rank, world, out: Path, params):
    """The save called where the parameters are temporarily gathered (FSDP1 summon_full_params)."""
    from backends import wrap
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped, _ = wrap(lora_model(params), params.get("backend", "fsdp1"))
    start = time.monotonic()
    try:
        with FSDP.summon_full_params(wrapped, writeback=False):
            shardsave.save_pretrained(wrapped, out / "adapter", timeout=params["timeout"])
    finally:
        (out / f"elapsed-{rank}").write_text(str(time.monotonic() - start))
    return {}


@scenario
def different_adapters(rank, world, out: Path, params):
    """Two valid adapters; each rank selects another one."""
    from peft import LoraConfig
    from tiny import peft_model

    qv = LoraConfig(target_modules=["q_proj", "v_proj"])
    model = peft_model(qv, adapters=[("other", qv)])
    shardsave.save_pretrained(model, out / "ours", selected_adapters=["default" if rank == 0 else "other"])
    return {}


@scenario
def bad_adapter_on_one_rank(rank, world, out: Path, params):
    model = lora_model(params)
    shardsave.save_pretrained(model, out / "ours", selected_adapters=["default"] if rank == 0 else ["nope"])
    return {}


@scenario
def backend_save(rank, world, out: Path, params):
    """Train under a backend, save with shardsave; rank 0 writes PEFT's save of the same weights."""
    from backends import full_state, sharded_logits, train, wrap
    from peft import LoraConfig
    from tiny import peft_model

    backend = params["backend"]
    if params.get("round_bytes"):  # force many gather rounds
        import shardsave.plan.ranges as plan

        plan.MAX_ROUND_BYTES = params["round_bytes"]
    lora_kwargs = params.get("lora", {"target_modules": ["q_proj", "v_proj"]})
    save_kwargs = dict(params.get("save", {}))
    if params.get("pissa"):  # PiSSA-initialised (base weights mutated); rank 0 keeps the initial adapter
        from tiny import pissa_model, save_initial

        lora = LoraConfig(init_lora_weights="pissa", **lora_kwargs)
        model = pissa_model(lora_kwargs, **params.get("model", {}))
        if rank == 0:
            save_initial(model, out / "initial")
        dist.barrier()
        save_kwargs["path_initial_model_for_weight_conversion"] = str(out / "initial")
    else:
        lora = LoraConfig(**lora_kwargs)
        model = peft_model(lora, **params.get("model", {}))
    wrapped, opt = wrap(
        model,
        backend,
        checkpointing=params.get("checkpointing", False),
        compile=params.get("compile", False),
        device=params.get("device", "cpu"),
    )
    train(wrapped, opt, backend, rank, steps=params.get("steps", 2))
    target = model if params.get("pass_inner") else wrapped
    with CommAudit() as audit:
        if params.get("via_callback"):
            trainer_on_save(model, rank, out, save_kwargs)
        else:
            shardsave.save_pretrained(target, out / "ours", **save_kwargs)
    (out / f"comm-{rank}.json").write_text(json.dumps(audit.calls))
    if params.get("shards"):
        with CommAudit() as shard_audit:
            shardsave.save_shards(target, out / "shards", **params.get("save_shards", {}))
        (out / f"shard-comm-{rank}.json").write_text(json.dumps(shard_audit.calls))
    gathered = None
    if params.get("also_gather"):
        got = shardsave.gather_state_dict(target)
        gathered = len(got)
        if rank == 0:
            torch.save(got, out / "gathered.pt")
    torch_logits = sharded_logits(wrapped)
    state = full_state(wrapped, backend)
    if rank == 0:
        save_reference(lora, state, out, torch_logits, params.get("model", {}), **save_kwargs)
        torch.save({k: v for k, v in state.items()}, out / "full_state.pt")
    return {"gathered": gathered}


@scenario
def per_node_paths(rank, world, out: Path, params):
    """Each rank as if on its own node: its own working directory; the base model's config.json (a smaller
    vocabulary: the embeddings were resized) only where the writer runs; relative paths everywhere."""
    from backends import full_state, wrap
    from peft import LoraConfig
    from tiny import llama_config, peft_model

    node = out / f"node{rank}"
    node.mkdir(exist_ok=True)
    os.chdir(node)
    if rank == 0:
        llama_config(vocab=64).save_pretrained("base")
    lora = LoraConfig(target_modules=["q_proj", "v_proj"])
    model = peft_model(lora)
    model.peft_config["default"].base_model_name_or_path = "base"
    wrapped, _ = wrap(model, params.get("backend", "fsdp2"))
    shardsave.save_pretrained(wrapped, "adapter")
    shardsave.save_shards(wrapped, "shards")
    state = full_state(wrapped, params.get("backend", "fsdp2"))
    if rank == 0:
        reference = peft_model(lora)
        reference.load_state_dict(state, strict=False)
        reference.peft_config["default"].base_model_name_or_path = "base"
        reference.save_pretrained("theirs")
    return {"cwd": str(node)}


@scenario
def writer_out_of_memory(rank, world, out: Path, params):
    """The writer cannot allocate its gather buffers: an agreed error on every rank, before any tensor moves."""
    from backends import wrap

    import shardsave.ranks.collect.sharded as sharded

    if rank == 0:

        def no_memory(nbytes, device, *, pinned=False):
            raise torch.OutOfMemoryError(f"could not allocate {nbytes} bytes on {device}")

        sharded._empty = no_memory
    wrapped, _ = wrap(lora_model(params), params.get("backend", "fsdp2"))
    with CommAudit() as audit:
        try:
            shardsave.save_pretrained(wrapped, out / "adapter", timeout=30)
        finally:
            (out / f"comm-{rank}.json").write_text(json.dumps(audit.calls))
    return {}
