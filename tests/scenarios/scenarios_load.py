"""Multi-rank scenarios of `shardsave.load_pretrained`: the resume matrix across backends and world sizes
(`load_matrix`), and under DeepSpeed loads the next step would undo, loads that stop halfway, and the files each
rank opens for a shard set (issue 23, items 5 and 11)."""

from __future__ import annotations

import builtins
import io
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from scenario_tools import destroy, save_reference
from workers import scenario

import shardsave

LORA = {"target_modules": ["q_proj", "v_proj"]}


@contextmanager
def opens_under(folder: Path):
    """Counts the opens of each file under `folder` (Python's `open` and `io.open`, `os.open`, safetensors'
    `safe_open`)."""
    import shardsave.storage.streaming as stream

    counts: Counter = Counter()
    root = os.path.abspath(folder)

    def note(path) -> None:
        path = os.path.abspath(os.fspath(path)) if isinstance(path, str | os.PathLike) else ""
        if path.startswith(root + os.sep):
            counts[os.path.relpath(path, root)] += 1

    saved = builtins.open, os.open, stream.safe_open

    def py_open(file, *args, **kwargs):
        note(file)
        return saved[0](file, *args, **kwargs)

    def os_open(path, *args, **kwargs):
        note(path)
        return saved[1](path, *args, **kwargs)

    def safe_open(path, *args, **kwargs):
        note(path)
        return saved[2](path, *args, **kwargs)

    builtins.open, io.open, os.open, stream.safe_open = py_open, py_open, os_open, safe_open
    try:
        yield counts
    finally:
        builtins.open, os.open, stream.safe_open = saved
        io.open = saved[0]


def _zero3(model, *, optimizer: bool):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }  # fmt: skip
    if not optimizer:  # evaluation: no optimizer, hence no fp32 masters (DeepSpeed's own "optimizer" is its offload)
        return deepspeed.initialize(model=model, config=config)[0]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    return deepspeed.initialize(model=model, optimizer=opt, config=config)[0]


def _step(engine, rank: int) -> None:
    """One optimizer step with lr=0: the weights must stay what was loaded (DeepSpeed copies its fp32 masters
    back into them)."""
    ids = torch.randint(1, 90, (2, 8), generator=torch.Generator().manual_seed(rank))
    engine.train()
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.eval()


@scenario
def load_guards(rank, world, out: Path, params):
    """Several load cases in one launch, each on fresh 2-rank DeepSpeed engines; every rank returns what it saw.

    saved: a ZeRO-3 model with random LoRA weights, saved with save_pretrained (`adapter`) and save_shards
    (`shards`); its sharded logits are the target. no_optimizer: a ZeRO-3 engine built without an optimizer loads
    the shard set twice (opens counted per file), then the adapter folder. gathered: inside
    GatheredParameters(modifier_rank=0) (whose exit re-partitions from rank 0's full copy), then an lr=0 step.
    refused: rank 1 alone holds a parameter whose partition is on NVMe: every rank refuses, no partition changed.
    stage0: a bf16 stage-0 engine (FP16_UnfusedOptimizer with its own fp32 copies) loads through `engine.module`,
    then an lr=0 step."""
    import deepspeed
    from backends import sharded_logits
    from peft import LoraConfig
    from tiny import peft_model, randomize_trainable

    lora = LoraConfig(**LORA)

    def fresh(seed: int):
        model = peft_model(lora)
        randomize_trainable(model, seed=seed)
        return model

    result: dict = {}
    engine = _zero3(fresh(4), optimizer=True)
    shardsave.save_pretrained(engine, out / "adapter")
    shardsave.save_shards(engine, out / "shards")
    want = sharded_logits(engine)
    engine.destroy()

    # no optimizer: partitions only, twice in a row (several adapters evaluated with one engine)
    engine = _zero3(fresh(9), optimizer=False)
    before = sharded_logits(engine)
    try:
        with opens_under(out / "shards") as counts:
            shardsave.load_pretrained(engine, out / "shards")
        result["no_optimizer_opens"] = dict(counts)
        shardsave.load_pretrained(engine, out / "adapter")
    except Exception as exc:  # recorded, so that one launch shows every case
        result["no_optimizer_error"] = f"{type(exc).__name__}: {exc}"
    after = sharded_logits(engine)
    result["no_optimizer"] = [torch.allclose(before, want, atol=1e-3), torch.allclose(after, want, atol=1e-5)]
    engine.destroy()

    # gathered at the time of the load
    engine = _zero3(fresh(9), optimizer=True)
    lora_params = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=0):
        shardsave.load_pretrained(engine, out / "adapter")
    after = sharded_logits(engine)
    _step(engine, rank)
    stepped = sharded_logits(engine)
    result["gathered"] = [torch.allclose(after, want, atol=1e-5), torch.allclose(stepped, want, atol=1e-5)]

    # one rank refuses: no rank writes anything
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    with torch.no_grad():
        for p in lora_params:
            p.ds_tensor.zero_()  # so that any write of the load shows
    target = next(p for n, p in engine.module.named_parameters() if p.requires_grad and "v_proj.lora_B" in n)
    if rank == 1:  # what DeepSpeed sets on a partition kept in NVMe (offload_param device "nvme")
        target.ds_tensor.final_location = OffloadDeviceEnum.nvme
    try:
        shardsave.load_pretrained(engine, out / "shards")
        result["refused"] = None
    except Exception as exc:
        result["refused"] = f"{type(exc).__name__}: {exc}"
    target.ds_tensor.final_location = None
    result["refused_unchanged"] = all(int(torch.count_nonzero(p.ds_tensor)) == 0 for p in lora_params)
    engine.destroy()

    # stage 0, bf16: the optimizer's own fp32 copies
    model = fresh(9)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}
    engine = deepspeed.initialize(model=model, optimizer=opt, config=config)[0]
    saved = fresh(4).state_dict()
    shardsave.load_pretrained(engine.module, out / "adapter")  # the module: the engine is found back
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    copies = [c for group in engine.optimizer.fp32_groups for c in group]
    result["stage0_masters"] = (
        type(engine.optimizer).__name__,
        all(torch.equal(c.view(-1), saved[n].view(-1)) for (n, _), c in zip(trainable, copies, strict=True)),
    )
    _step(engine, rank)
    result["stage0_stepped"] = all(torch.equal(p, saved[n].to(p.dtype)) for n, p in trainable)
    engine.destroy()
    return result


@scenario
def load_matrix(rank, world, out: Path, params):
    """Resume, across backends and world sizes. Phase "save": for each of `params["backends"]`, train under it and
    save with save_pretrained (`<backend>/adapter`) and save_shards (`<backend>/shards`); rank 0 keeps the
    trained model's logits, PEFT's own save of it (`<backend>/theirs`) and, once, an adapter of another config
    (`other_r`). Phase "load": for each `[source, backend, via]`, a fresh model with other adapter weights,
    wrapped under `backend`, loads `<source>/<via>`; its logits before, after, after one lr=0 optimizer step,
    and after a refused load of `other_r` (with the error of each rank) go to `load-<i>-<rank>.pt`."""
    from backends import full_state, sharded_logits, train, wrap
    from peft import LoraConfig
    from tiny import peft_model, randomize_trainable

    lora = LoraConfig(**params.get("lora", {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}))
    if params["phase"] == "save":
        for backend in params["backends"]:
            folder = out / backend
            wrapped, opt = wrap(peft_model(lora), backend)
            train(wrapped, opt, backend, rank)
            shardsave.save_pretrained(wrapped, folder / "adapter")
            shardsave.save_shards(wrapped, folder / "shards")
            trained = sharded_logits(wrapped)
            state = full_state(wrapped, backend)
            if rank == 0:
                torch.save(trained, folder / "logits.pt")
                save_reference(lora, state, folder)
            destroy(wrapped)
        if rank == 0:
            other = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"], r=2, modules_to_save=["lm_head"]))
            other.save_pretrained(str(out / "other_r"))
        return {}
    for i, (source, backend, via) in enumerate(params["pairs"]):
        model = peft_model(lora)
        randomize_trainable(model, seed=9)  # other adapter weights than any saved one
        wrapped, opt = wrap(model, backend)
        record: dict = {"before": sharded_logits(wrapped)}
        result = shardsave.load_pretrained(wrapped, out / source / via)
        record["after"] = sharded_logits(wrapped)
        record["missing"], record["unexpected"] = len(result.missing_keys), list(result.unexpected_keys)
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = 0.0
        else:  # a DeepSpeed engine: its optimizer's groups
            for group in wrapped.optimizer.param_groups:
                group["lr"] = 0.0
        train(wrapped, opt, backend, rank, steps=1)
        record["stepped"] = sharded_logits(wrapped)
        try:
            shardsave.load_pretrained(wrapped, out / "other_r")
            record["refused"] = None
        except Exception as exc:
            record["refused"] = f"{type(exc).__name__}: {exc}"
        record["after_refused"] = sharded_logits(wrapped)
        torch.save(record, out / f"load-{i}-{rank}.pt")
        destroy(wrapped)
    return {}
