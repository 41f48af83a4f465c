"""Per-rank bodies of the multi-rank tests. Run by tests/helpers/multirank.py as `workers.py SCENARIO DIR PARAMS`.

Each scenario returns a JSON-able dict; an exception becomes {"ok": false, "error": ..., "type": ...}
so that the test can assert on the error every rank raised.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import shardsave

SCENARIOS = {}

_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_object",
    "broadcast",
    "all_reduce",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "send",
    "recv",
    "all_to_all_single",
    "batch_isend_irecv",  # (isend / irecv themselves are not wrapped: P2POp checks their identity)
)


def _nbytes(args) -> int:
    """Bytes a collective call carries; for point-to-point batches, what this rank sends."""
    total = 0
    for a in args:
        if torch.is_tensor(a):
            total += a.numel() * a.element_size()
        elif isinstance(a, list):
            sends = [op.tensor for op in a if op.op is dist.distributed_c10d.isend]
            total += sum(t.numel() * t.element_size() for t in sends)
    return total


class CommAudit:
    """Records every torch.distributed collective (name, bytes) called while active."""

    def __enter__(self):
        self.calls, self._saved = [], {}
        for name in _COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def spy(*args, _name=name, _original=original, **kwargs):
                self.calls.append([_name, _nbytes(args)])
                return _original(*args, **kwargs)

            setattr(dist, name, spy)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def lora_model(params: dict, **kwargs):
    from peft import LoraConfig
    from tiny import peft_model

    lora = dict(params.get("lora", {"target_modules": ["q_proj", "v_proj"]}))
    return peft_model(LoraConfig(**lora), **params.get("model", {}), **kwargs)


def save_reference(lora, state: dict, out: Path, logits=None, model_kwargs: dict | None = None, **save_kwargs):
    """Rank 0's reference: PEFT's own save of the natively gathered weights (and the sharded logits)."""
    from tiny import peft_model

    reference = peft_model(lora, **(model_kwargs or {}))
    _, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected, unexpected[:5]
    reference.save_pretrained(str(out / "theirs"), **save_kwargs)
    if logits is not None:
        torch.save(logits, out / "logits.pt")


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
def replicas_out_of_sync(rank, world, out: Path, params):
    """Whole parameters on each rank (no DDP), changed on rank 1 only."""
    model = lora_model(params)
    if rank == 1:
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_A" in n).add_(1.0)
    shardsave.save_shards(model, out / "shards")
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


def _kill_self() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(point: str, stall: float = 60) -> None:
    """Make this process die by SIGKILL at `point` of the next save."""
    import shardsave.save.gathered as save_module
    import shardsave.save.shards as shards_module
    import shardsave.storage.local as writer_module
    from shardsave.ranks.collect.sharded import Transfer

    def before(owner, name):
        original = getattr(owner, name)

        def hook(*args, **kwargs):
            _kill_self()
            return original(*args, **kwargs)

        setattr(owner, name, hook)

    if point == "gather":  # agreed, about to send its slices
        before(Transfer, "_send")
    elif point == "hang_gather":  # alive but stuck (a deadlock, a slow filesystem) before sending its slices
        original_send = Transfer._send

        def stuck(self, *args, **kwargs):
            time.sleep(stall)
            return original_send(self, *args, **kwargs)

        Transfer._send = stuck
    elif point == "weights":  # half of the weights file written in the hidden directory

        def partial(out, tensors, safe):
            (out / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
            _kill_self()

        save_module.write_weights = partial
    elif point == "publish":  # everything written in the hidden directory, not yet swapped in
        before(writer_module, "_fsync_tree")
    elif point == "swap":  # swapped in, the previous adapter not yet removed
        original = writer_module._rename_exchange

        def exchange_then_die(a, b):
            original(a, b)
            _kill_self()

        writer_module._rename_exchange = exchange_then_die
    elif point == "shard_write":  # this rank's shard half written

        def partial_shard(path, *args, **kwargs):
            Path(path).write_bytes(b"\x00" * 1000)
            _kill_self()

        shards_module.write_streaming = partial_shard
    elif point == "manifest":  # every shard written, the manifest not yet
        before(shards_module, "_atomic_write_text")
    elif point != "start":
        raise ValueError(point)


@scenario
def killed_mid_save(rank, world, out: Path, params):
    """A complete save, then the weights change and one rank is SIGKILLed at `point` of a second save."""
    from backends import wrap

    model = lora_model(params)
    wrapped, _ = wrap(model, "fsdp2")
    op, writer, timeout = params["op"], params.get("writer", 0), params["timeout"]

    def save():
        if op == "save_pretrained":
            shardsave.save_pretrained(wrapped, out / "adapter", is_main_process=(rank == writer), timeout=timeout)
        else:
            shardsave.save_shards(wrapped, out / "shards", timeout=timeout)

    save()
    dist.barrier()
    if rank == 0:
        shutil.copytree(out / ("adapter" if op == "save_pretrained" else "shards"), out / "previous")
    dist.barrier()
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(1.0)
    if rank == params["victim"]:
        if params["point"] == "start":
            _kill_self()
        _install_kill(params["point"], stall=timeout + 4)
        if params["point"] == "hang_gather":
            save()  # raises once the writer has given up and left
            return {}
    start = time.monotonic()
    try:
        save()
    finally:
        (out / f"elapsed-{rank}").write_text(str(time.monotonic() - start))
    return {}


@scenario
def plain_save(rank, world, out: Path, params):
    """A fresh job saving into the same places (the re-run after a failure)."""
    from backends import wrap

    wrapped, _ = wrap(lora_model(params), "fsdp2")
    if params["op"] == "save_pretrained":
        shardsave.save_pretrained(wrapped, out / "adapter")
    else:
        shardsave.save_shards(wrapped, out / "shards")
    return {}


def main() -> None:
    name, out, params = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = os.environ.get("SHARDSAVE_TEST_PG", "gloo")
    if name != "accelerate_save":  # accelerate sets up its own process group
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = {"ok": True, **(SCENARIOS[name](rank, world, out, params) or {})}
    except Exception as exc:
        traceback.print_exc()
        result = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
    (out / f"result-{rank}.json").write_text(json.dumps(result))
    # leave together, then skip interpreter teardown: a rank that tore down gloo while its peer was still
    # busy occasionally aborted in C++ ("terminate called without an active exception") after its result
    # was written
    try:
        if dist.is_initialized() and not params.get("no_barrier"):
            dist.monitored_barrier(timeout=timedelta(seconds=30)) if backend == "gloo" else dist.barrier()
            dist.destroy_process_group()
    except Exception:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def trainer_on_save(model, rank: int, out: Path, save_kwargs: dict) -> None:
    """What Trainer does at a save step, minus Trainer (whose FSDP / ZeRO-3 setup needs accelerators): rank 0
    writes its own files into `checkpoint-3/`, then every rank runs the callbacks' `on_save` with the model
    Trainer hands to callbacks (the unwrapped one it was given). Rank 0 copies the adapter's files to `out/ours`."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from shardsave.integrations import ShardSaveCallback

    args = TrainingArguments(output_dir=str(out / "run"), use_cpu=True, report_to=[])
    state = TrainerState(global_step=3)
    checkpoint = out / "run" / "checkpoint-3"
    if rank == 0:
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        (checkpoint / "adapter_model.safetensors").write_bytes(b"Trainer's empty adapter")
    dist.barrier()
    for callback in (ShardSaveCallback(**save_kwargs), ShardSaveCallback(shards=True)):
        callback.on_save(args, state, TrainerControl(), model=model)
    if rank == 0:
        (out / "ours").mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
            shutil.copyfile(checkpoint / name, out / "ours" / name)


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


def _destroy(wrapped) -> None:
    if hasattr(wrapped, "destroy"):  # a DeepSpeed engine
        wrapped.destroy()


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
            _destroy(wrapped)
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
        _destroy(wrapped)
    return {}


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
            _destroy(wrapped)
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
        _destroy(wrapped)
        _destroy(loaded)
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


def _private_mount(path: Path) -> bool:
    """Give this process its own empty view of `path` (a tmpfs in a new mount namespace), as a rank on another
    node without a shared filesystem would have; False where the kernel refuses."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ms_rec, ms_private, clone_newns = 0x4000, 1 << 18, 0x00020000
    return (
        libc.unshare(clone_newns) == 0
        and libc.mount(b"none", b"/", None, ms_rec | ms_private, None) == 0
        and libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", 0, None) == 0
    )


@scenario
def unshared_shards(rank, world, out: Path, params):
    """save_shards where rank 1 does not see rank 0's filesystem under the shard directory."""
    from backends import wrap

    private = out / "private"
    private.mkdir(exist_ok=True)
    mounted = _private_mount(private) if rank == 1 else True
    ok = [None] * world
    dist.all_gather_object(ok, mounted)
    if not all(ok):
        return {"skipped": "mount namespaces are not available here"}
    wrapped, _ = wrap(lora_model(params), "fsdp2")
    if not params.get("node_local"):
        shardsave.save_shards(wrapped, private / "shards", timeout=30)
        return {}
    # node-local disks: each "node" writes its folder, rank 1's is copied back as a user would
    shardsave.save_shards(wrapped, private / "shards", timeout=30, shared_filesystem=False)
    shardsave.save_pretrained(wrapped, out / "reference", timeout=30)
    if rank == 1:
        shutil.copytree(private / "shards", out / "node1")
    return {}


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


def _adapter_state(model, layout: str = "") -> dict[str, torch.Tensor]:
    """This rank's trainable tensors, full (an FSDP2 stage's gathered over its data-parallel ranks, an FSDP1
    stage's through its full state dict)."""
    from torch.distributed.tensor import DTensor

    if layout.endswith("fsdp1"):
        from backends import full_state

        from shardsave.plan.names import canonical_name

        names = {canonical_name(n) for n, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in full_state(model, "fsdp1").items() if k in names}
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def _all_stages(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's `_adapter_state` in one dict (the stages' union, as the pipeline trained it)."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, state)
    return {k: v for part in parts for k, v in part.items()}


@scenario
def pp_save(rank, world, out: Path, params):
    """Two pipeline stages on a ("pp", "dp") 2 x 2 mesh, for each of `params["layouts"]`: "pp" (plain stages,
    two replicas each), "pp_fsdp2" (FSDP2 over "dp" inside each stage), "pp_renumbered" (stage 1 renumbers its
    layers: refused). Train through `torch.distributed.pipelining`, then save_pretrained, save_shards and
    gather_state_dict; load the save into fresh stages. Rank 0 writes PEFT's save of all stages' weights
    (`theirs`), the trained and loaded states; the last stage writes the pipeline's logits."""
    from peft import LoraConfig
    from pipeline import StageModule, cut_stage, pipeline_logits, train_by_hand, train_pipeline
    from tiny import VOCAB, peft_model, randomize_trainable
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lora = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    meshes = {  # "pp_fsdp1": stages on ranks {0, 2} and {1, 3}, so FSDP1's groups are no blocks of consecutive ranks
        order: init_device_mesh("cpu", (2, 2), mesh_dim_names=order) for order in (("pp", "dp"), ("dp", "pp"))
    }

    def build(layout: str, mesh, stage: int, seed: int | None = None):
        model = peft_model(lora)
        if seed is not None:
            randomize_trainable(model, seed=seed)
        cut_stage(model, stage, renumber=layout == "pp_renumbered")
        if layout == "pp_fsdp2":
            for layer in model.base_model.model.model.layers:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        if layout == "pp_fsdp1":
            from peft.utils.other import fsdp_auto_wrap_policy
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP(
                model, device_id=torch.device("cpu"), use_orig_params=True, process_group=mesh["dp"].get_group(),
                auto_wrap_policy=fsdp_auto_wrap_policy(model),
            )  # fmt: skip
        return model

    for layout in params["layouts"]:
        folder = out / layout
        folder.mkdir(exist_ok=True)
        mesh = meshes[("dp", "pp") if layout == "pp_fsdp1" else ("pp", "dp")]
        stage, replica = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
        model = build(layout, mesh, stage)
        module = StageModule(model, stage)
        peer = dist.get_global_rank(mesh["pp"].get_group(), 1 - stage)
        if layout == "pp_fsdp1":
            train_by_hand(module, stage, peer)
        elif layout != "pp_renumbered":
            train_pipeline(module, stage, mesh["pp"].get_group())
        try:
            shardsave.save_pretrained(model, folder / "ours")
        except Exception as exc:
            (folder / f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
            continue
        shardsave.save_shards(model, folder / "shards")
        try:
            shardsave.save_merged(model, folder / "merged")
            (folder / f"merged-{rank}.txt").write_text("returned")
        except Exception as exc:
            (folder / f"merged-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        gathered = shardsave.gather_state_dict(model)
        trained = _all_stages(_adapter_state(model, layout))
        ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))  # tiny.logits' input
        piped = pipeline_logits(module, stage, peer, ids)
        fresh = build(layout, mesh, stage, seed=9)
        result = shardsave.load_pretrained(fresh, folder / "ours")
        loaded = _all_stages(_adapter_state(fresh, layout))
        if rank == 0:
            save_reference(lora, trained, folder)
            torch.save({"trained": trained, "loaded": loaded, "gathered": gathered}, folder / "states.pt")
        if stage == 1 and replica == 0:
            torch.save(piped, folder / "logits.pt")
        (folder / f"load-{rank}.json").write_text(json.dumps(list(result.unexpected_keys)))
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
        _destroy(wrapped)
    return {}


def _merged_disk_full(wrapped, folder: Path, rank: int, *, parallel: bool) -> None:
    """A disk fills up mid-save: the writer's after its first file while the others send (`parallel` False), or
    rank 1's while every rank writes its runs into the staged files. Every rank raises, nothing is published,
    the previous folder stays as it was."""
    import errno

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


def _load_scenario_modules() -> None:
    """The scenarios of each operation live in `tests/scenarios/scenarios_<topic>.py` (they register with
    `workers.scenario`)."""
    import importlib

    sys.modules.setdefault("workers", sys.modules[__name__])
    folder = Path(__file__).parents[1] / "scenarios"
    sys.path.insert(0, str(folder))
    for path in sorted(folder.glob("scenarios_*.py")):
        importlib.import_module(path.stem)


if __name__ == "__main__":
    _load_scenario_modules()
    main()
