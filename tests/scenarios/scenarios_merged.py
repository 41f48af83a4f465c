"""Multi-rank scenarios of `save_merged`: against PEFT's merge_and_unload() across backends and variants, with a
disk filling up (`merged_save`, tests/merged/test_live.py), and failing on one rank
(tests/merged/test_live_failures.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from scenario_tools import destroy, lora_model
from workers import scenario

import shardsave


def _outcome(call) -> dict:
    start = time.monotonic()
    try:
        call()
        text = "returned"
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
    return {"outcome": text, "elapsed": time.monotonic() - start}


def _once(owner, name: str, replacement, *, call: int = 1):
    """Replace `owner.name` by `replacement(real, *args)` at its `call`-th call only; returns an undo function."""
    real, calls = getattr(owner, name), []

    def hook(*args, **kwargs):
        calls.append(None)
        if len(calls) == call:
            return replacement(real, *args, **kwargs)
        return real(*args, **kwargs)

    setattr(owner, name, hook)
    return lambda: setattr(owner, name, real)


@scenario
def merged_failures(rank, world, out: Path, params):
    """An FSDP2 model saved merged once (parallel write), then one save per case in which one rank fails at one
    point: `factors_prepare` (rank 1 cannot prepare the factor gather), `factors_sent` (rank 1's factor gather
    fails after its bytes went out: the writer would enter the broadcast alone), `merge` / `merge_parallel`
    (rank 1's merge of a run fails, streaming / writing in parallel), `zeros` (rank 1's pwrite lands as zeros,
    as on a filesystem that keeps the last writer), `fuse_writer` / `fuse_rank1` (that rank sees the folder on
    gcsfuse: the save streams). Then a plain model whose LoRA copies drifted apart on rank 1 (`replicas`), and
    pipeline stages whose writer runs out of memory preparing the restaged gather (`restage`, save_pretrained).
    Each rank records its outcome and time per case."""
    from backends import wrap
    from pipeline import cut_stage

    import shardsave.merged.exchange as exchange
    import shardsave.merged.parallel as parallel
    import shardsave.ranks.collect.staged as staged
    from shardsave.ranks.collect.sharded import ShardedCollector

    timeout = params["timeout"]
    wrapped, _ = wrap(lora_model(params), "fsdp2")
    target = out / "merged"
    results = {}

    def save(**kwargs):
        shardsave.save_merged(wrapped, target, max_shard_size="40KB", timeout=timeout, **kwargs)

    save()
    dist.barrier()
    if rank == 0:
        (out / "first.json").write_text(json.dumps({p.name: p.read_bytes().hex() for p in target.iterdir()}))
    dist.barrier()

    def fail(exc):
        def replacement(real, *args, **kwargs):
            raise exc

        return replacement

    def sent_then_failed(real, *args, **kwargs):
        real(*args, **kwargs)
        return {}, shardsave.SaveError("injected: rank 1's factor gather failed after sending")

    def zeros(real, fd, data, at):
        return real(fd, bytes(memoryview(data).nbytes), at)

    pwrites = []

    def counting(real):
        def pwrite(*args):
            pwrites.append(None)
            return real(*args)

        return pwrite

    cases = {
        "factors_prepare": (1, ShardedCollector, "prepare_gather", fail(MemoryError("injected: no memory")), {}),
        "factors_sent": (1, exchange, "run_gather", sent_then_failed, {"parallel_write": False}),
        "merge": (1, exchange, "merge_on", fail(RuntimeError("injected: merge failed")), {"parallel_write": False}),
        "merge_parallel": (1, exchange, "merge_on", fail(RuntimeError("injected: merge failed")), {}),
        "zeros": (1, parallel.os, "pwrite", zeros, {}),
        "fuse_writer": (0, parallel, "filesystem_type", lambda real, path: "fuse.gcsfuse", {}),
        "fuse_rank1": (1, parallel, "filesystem_type", lambda real, path: "fuse.gcsfuse", {}),
    }
    for case in params["cases"]:
        victim, owner, name, replacement, kwargs = cases[case]
        real_pwrite = parallel.os.pwrite
        pwrites.clear()
        parallel.os.pwrite = counting(real_pwrite)  # os itself: every pwrite of this process is counted
        undo = _once(owner, name, replacement, call=2 if name == "merge_on" else 1) if rank == victim else None
        try:
            results[case] = _outcome(lambda kwargs=kwargs: save(**kwargs))
        finally:
            if undo is not None:
                undo()
            parallel.os.pwrite = real_pwrite
        results[case]["pwrites"] = len(pwrites)
        results[case]["after"] = {p.name: p.read_bytes().hex() for p in target.iterdir()} == json.loads(
            (out / "first.json").read_text()
        )
        dist.barrier()  # the writer has cleaned up
        results[case]["leftovers"] = [p.name for p in out.iterdir() if p.name.startswith(".")]

    if "replicas" in params["extra"]:
        plain = lora_model(params)
        if rank == 1:
            with torch.no_grad():
                next(p for n, p in plain.named_parameters() if "lora_A" in n).add_(1.0)
        results["replicas"] = _outcome(lambda: shardsave.save_merged(plain, out / "drifted", timeout=timeout))
        results["replicas"]["written"] = (out / "drifted").exists()
        dist.barrier()
    if "restage" in params["extra"]:
        stage = cut_stage(lora_model(params), rank)
        oom = fail(torch.OutOfMemoryError("injected: no memory"))
        undo = _once(staged.StagedCollector, "prepare_gather", oom) if rank == 0 else None
        try:
            results["restage"] = _outcome(lambda: shardsave.save_pretrained(stage, out / "stages", timeout=timeout))
        finally:
            if undo is not None:
                undo()
        results["restage"]["written"] = (out / "stages").exists()
    (out / f"outcomes-{rank}.json").write_text(json.dumps(results))
    return {}


@scenario
def merged_save(rank, world, out: Path, params):
    """For each `[backend, variant]` of `params["cases"]` (variant: "lora" with lm_head in modules_to_save, "dora",
    "dora_bf16"): train under the backend, save_merged; rank 0 writes PEFT's merge_and_unload().save_pretrained()
    of the natively gathered weights (`theirs`) and the merged model's logits; every rank records whether the live
    model's logits are unchanged by the save and by a training step after it."""
    from backends import full_state, sharded_logits, train, wrap
    from peft import LoraConfig
    from tiny import logits, peft_model

    variants = {
        "lora": ({"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}, None),
        "dora": ({"target_modules": ["q_proj", "v_proj", "o_proj"], "use_dora": True}, None),
        "dora_bf16": ({"target_modules": ["q_proj", "v_proj"], "use_dora": True, "use_rslora": True}, "bfloat16"),
    }
    for backend, variant, parallel in params["cases"]:
        folder = out / f"{backend}-{variant}"
        folder.mkdir(exist_ok=True)
        config, dtype = variants[variant]
        lora = LoraConfig(**config)
        model = peft_model(lora, dtype=dtype)
        wrapped, opt = wrap(model, backend)
        train(wrapped, opt, backend, rank)
        before = sharded_logits(wrapped)
        shardsave.save_merged(wrapped, folder / "ours", max_shard_size="40KB", parallel_write=parallel)
        unchanged = torch.equal(sharded_logits(wrapped), before)
        state = full_state(wrapped, backend)
        train(wrapped, opt, backend, rank, steps=1)  # training goes on after the save
        if rank == 0:
            reference = peft_model(lora, dtype=dtype)
            reference.load_state_dict(state, strict=False)
            merged = reference.merge_and_unload()
            merged.save_pretrained(str(folder / "theirs"), max_shard_size="40KB")
            torch.save(logits(merged), folder / "logits.pt")
        (folder / f"unchanged-{rank}.json").write_text(json.dumps(unchanged))
        if params.get("disk_full") == [backend, variant]:
            _merged_disk_full(wrapped, folder, rank, parallel=False)
            _merged_disk_full(wrapped, folder, rank, parallel=True)
        destroy(wrapped)
    return {}


def _merged_disk_full(wrapped, folder: Path, rank: int, *, parallel: bool) -> None:
    """A disk fills up mid-save: the writer's after its first file while the others send (`parallel` False), or
    rank 1's while every rank writes its runs into the staged files. Every rank raises, nothing is published,
    the previous folder stays as it was."""
    import errno
    import os

    from shardsave.merged import exchange as merged_exchange

    name = "pwrite" if parallel else "write_streaming"
    owner = os if parallel else merged_exchange
    real, calls = getattr(owner, name), []

    def full(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1 and rank == (1 if parallel else 0):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    setattr(owner, name, full)
    try:
        shardsave.save_merged(wrapped, folder / "ours", max_shard_size="40KB", timeout=60, parallel_write=parallel)
        outcome = "returned"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        setattr(owner, name, real)
    (folder / f"disk-full-{'parallel' if parallel else 'writer'}-{rank}.txt").write_text(outcome)
