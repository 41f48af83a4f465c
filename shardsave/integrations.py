"""Hooks for where users already are: a `transformers.TrainerCallback` and an `accelerate` helper.

transformers comes with PEFT; accelerate stays optional (the helper only uses the object it is given).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from shardsave.errors import RemoteError
from shardsave.log import logger
from shardsave.ranks.heartbeat import Heartbeat
from shardsave.ranks.identity import Ranks, resolve_timeout
from shardsave.ranks.rendezvous import Rendezvous, raise_on_failure, status_of
from shardsave.save.gathered import save_pretrained
from shardsave.save.shards import save_shards

__all__ = [
    "ShardSaveCallback",
    "save_with_accelerator",
    "main_process_of",
    "trainer_writer",
    "trainer_checkpoint_dir",
    "agreed_checkpoint_dir",
]

TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME (that module is heavy to import)


def main_process_of(accelerator) -> bool | None:
    """`accelerator.is_main_process` as shardsave's `is_main_process`, or None (rank 0 writes) when accelerate
    counts fewer processes than torch.distributed (it does with DeepSpeed on CPU, where every rank then
    reports being the main process)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return accelerator.is_main_process if accelerator.num_processes == world else None


def save_with_accelerator(accelerator, model, save_directory, **kwargs) -> None:
    """`shardsave.save_pretrained` with the writer chosen by `accelerator` (see `main_process_of`); call it
    on every process."""
    save_pretrained(model, save_directory, is_main_process=main_process_of(accelerator), **kwargs)


class ShardSaveCallback(TrainerCallback):
    """Writes a correct adapter into every `checkpoint-N/` that Trainer saves, and restores it on resume.

    Under FSDP or ZeRO-3, Trainer's own save of a PEFT model writes an empty or full-model adapter, or gathers
    the whole model to write it. This callback runs on every rank after Trainer's save (`on_save`) and replaces
    the adapter's files in the checkpoint Trainer just wrote (`trainer_checkpoint_dir`) with what
    `PeftModel.save_pretrained` writes for the same weights, moving only the adapter. Each file is replaced
    atomically; optimizer, scheduler, RNG and DeepSpeed files are not touched. The writer follows Trainer's
    rule (`trainer_writer`). With `shards=True` each rank writes its shard into `checkpoint-N/adapter_shards/`
    instead (`python -m shardsave.merge` later).

    `push_to_hub=True`: Trainer pushes inside its save, before any callback's `on_save`, so what it uploads
    (the output directory's copy and, with `hub_strategy="checkpoint"` or `"all_checkpoints"`, the checkpoint
    folder, in the background) holds Trainer's own adapter, and the upload may see the callback's files arrive
    (each whole) and its hidden temporary folder. Set `push_to_hub=False` and upload a checkpoint after this
    callback (e.g. `huggingface_hub.upload_folder` from the main process in a callback listed after this one),
    or once training ends.

    Between Trainer's save and `on_save` the main process alone writes `trainer_state.json`, may push, and
    deletes old checkpoints (`save_total_limit`), which can take long; the others wait in `on_save`. Rank 0
    keeps a heartbeat from the end of a step or epoch that saves (`on_step_end` / `on_epoch_end`) until
    `on_save`: the others wait for it as long as the heartbeat goes on (see `Rendezvous.wait_for`), and only
    `timeout` (by default 90% of the process group's own) once it stops.
    """

    def __init__(self, *, shards: bool = False, resume: bool = True, timeout: float | None = None, **save_kwargs):
        self.shards = shards
        self.resume = resume
        self.timeout = timeout
        self.save_kwargs = save_kwargs
        self._warned: set[str] = set()
        self._beat: Heartbeat | None = None

    def on_step_end(self, args, state, control, **kwargs):
        self._keep_alive(control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self._keep_alive(control)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self._stop_beat()  # a save that was planned and then not made (save_strategy="best")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._stop_beat()
        return control

    def _keep_alive(self, control) -> None:
        """Rank 0's heartbeat while Trainer saves, until `on_save`: the others know it is on its way."""
        ranks = Ranks.current()
        if control.should_save and ranks.distributed and ranks.rank == 0 and self._beat is None:
            self._beat = Rendezvous(ranks, op="ShardSaveCallback", timeout=resolve_timeout(self.timeout)).heartbeat()
            self._beat.__enter__()

    def _stop_beat(self) -> None:
        if self._beat is not None:
            self._beat.__exit__(None, None, None)
            self._beat = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """On `trainer.train(resume_from_checkpoint=...)`, load the adapter this callback saved into the
        checkpoint being resumed (`shardsave.load_pretrained`, every rank reading what it holds), after Trainer's
        own load: under FSDP and ZeRO-3 that one fails or restores rank 0's slices only. Trainer has restored
        `state.global_step` from the checkpoint by then, which names its folder. `resume=False` leaves it to
        Trainer."""
        if not self.resume or not state.global_step or model is None:
            return control
        from shardsave.load.pretrained import load_pretrained

        try:
            checkpoint = agreed_checkpoint_dir(args, state, timeout=self.timeout)
        except (FileNotFoundError, RemoteError) as exc:  # the same on every rank: rank 0 decided
            logger.warning("ShardSaveCallback: not restoring the adapter on resume: %s", exc)
            return control
        source = checkpoint / "adapter_shards" if self.shards else checkpoint
        options = {k: v for k, v in self.save_kwargs.items() if k == "allow_pickle"}
        load_pretrained(model, source, timeout=self.timeout, **options)
        logger.info("ShardSaveCallback: restored the adapter from %s", source)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        self._warn_once(args)
        try:
            checkpoint = agreed_checkpoint_dir(args, state, timeout=self.timeout)
        finally:
            self._stop_beat()
        if self.shards:
            options = {k: v for k, v in self.save_kwargs.items() if k in ("selected_adapters", "save_embedding_layers")}
            save_shards(model, checkpoint / "adapter_shards", timeout=self.timeout, **options)
        else:
            options = {"is_main_process": trainer_writer(args), "replace_files_only": True, **self.save_kwargs}
            save_pretrained(model, checkpoint, timeout=self.timeout, **options)
        return control

    def _warn_once(self, args) -> None:
        if getattr(args, "push_to_hub", False) and "push" not in self._warned:
            self._warned.add("push")
            logger.warning(
                "ShardSaveCallback: push_to_hub=True uploads Trainer's own adapter, pushed before callbacks run; "
                "set push_to_hub=False and upload the checkpoint after this callback (see its docstring)."
            )
        if getattr(args, "save_on_each_node", False) and not self.shards and "node" not in self._warned:
            self._warned.add("node")
            logger.warning(
                "ShardSaveCallback: save_on_each_node=True, but the adapter is written once, by the global main "
                "process; on other nodes' own disks the checkpoint keeps Trainer's adapter. Use a shared "
                "output_dir, or ShardSaveCallback(shards=True)."
            )


def trainer_writer(args) -> bool | None:
    """Trainer's choice of writer (`args.should_save`) as `is_main_process`.

    None (rank 0 writes) where Trainer counts a different number of processes than torch.distributed (DeepSpeed
    on CPU). With `save_on_each_node` Trainer writes once per node, but a save has a single writer: the global
    main process (`args.process_index == 0`) writes.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if getattr(args, "world_size", world) != world:
        return None
    if getattr(args, "save_on_each_node", False):
        return args.process_index == 0
    return bool(args.should_save)


def trainer_checkpoint_dir(args, state) -> Path:
    """The `checkpoint-{global_step}` folder Trainer has just written, found as Trainer names it.

    Under a hyperparameter search Trainer saves into `output_dir/<run name>/`; the run name reaches callbacks
    only when the search was given `hp_name` (`state.trial_name`). Otherwise the folder is the newest
    `output_dir/*/checkpoint-{global_step}` whose `trainer_state.json` records this trial's parameters.
    Raises `FileNotFoundError` when no such folder exists, rather than writing anywhere else.
    """
    root = Path(args.output_dir)
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    if state.trial_name:
        candidates = [root / state.trial_name / name]
    elif state.is_hyper_param_search:
        candidates = sorted(
            (p for p in root.glob(f"*/{name}") if _same_trial(p, state.trial_params)),
            key=lambda p: (p / TRAINER_STATE_NAME).stat().st_mtime_ns,
            reverse=True,
        )
    else:
        candidates = [root / name]
    found = next((p for p in candidates if p.is_dir()), None)
    if found is None:
        where = candidates[0] if candidates else root / "<run>" / name
        hint = (
            "pass hp_name= to trainer.hyperparameter_search(...) so that callbacks know the run directory"
            if state.is_hyper_param_search
            else "call on_save only after Trainer saved that checkpoint, with Trainer's own args"
        )
        raise FileNotFoundError(
            errno.ENOENT,
            f"ShardSaveCallback: Trainer's checkpoint for step {state.global_step} was not found at {where}, so "
            f"its adapter was not replaced (nothing is written elsewhere); {hint}",
            str(where),
        )
    return found


def _same_trial(checkpoint: Path, trial_params) -> bool:
    try:
        saved = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return saved.get("trial_params") == json.loads(json.dumps(trial_params))


def agreed_checkpoint_dir(args, state, *, timeout: float | None = None) -> Path:
    """`trainer_checkpoint_dir` as rank 0 finds it (it wrote the checkpoint), shared with every rank through
    the store, so that all ranks save to the same folder or all raise its error; other ranks need not see
    the folder (a node-local output_dir). The others wait for rank 0 as long as its heartbeat goes on (rank 0
    may arrive late: see `ShardSaveCallback`), else `timeout`."""
    ranks = Ranks.current()
    rdv = Rendezvous(ranks, op="ShardSaveCallback", timeout=resolve_timeout(timeout))
    if ranks.rank == 0:
        path, error = None, None
        try:
            path = trainer_checkpoint_dir(args, state)
        except Exception as exc:  # shared with the other ranks below, then re-raised
            error = exc
        if ranks.distributed:
            rdv.post("checkpoint", status_of(error, path=str(path)))
            rdv.forget_later()
        if error is not None:
            raise error
        return path
    status = rdv.wait_for("checkpoint", 0, heartbeat=True)
    rdv.forget_later()
    raise_on_failure({0: status}, own=None, ranks=ranks, op="ShardSaveCallback")
    return Path(status["path"])
