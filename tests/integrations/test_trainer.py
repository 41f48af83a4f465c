"""ShardSaveCallback: inside transformers.Trainer on 2 ranks every checkpoint holds an adapter that PEFT loads
and the last one reproduces the trained model; in one process, it replaces only the adapter's files of the
checkpoint Trainer wrote (found as Trainer names it) and writes through Trainer's writer."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from multirank import check_ok, run_ranks
from peft import LoraConfig, PeftModel
from tiny import assert_same_files, base_model, logits, peft_model
from transformers import TrainerControl, TrainerState, TrainingArguments

from shardsave.integrations import ShardSaveCallback, trainer_checkpoint_dir, trainer_writer

QV = ["q_proj", "v_proj"]


@pytest.mark.multirank
def test_trainer_callback_two_ranks(tmp_path):
    results = run_ranks("trainer_callback", tmp_path, limit=400)
    check_ok(results)
    assert results[0].result["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
    last = tmp_path / "run" / "checkpoint-2"
    assert (last / "adapter_model.safetensors").exists() and (last / "trainer_state.json").exists()
    loaded = PeftModel.from_pretrained(base_model(), str(last)).eval()
    torch.testing.assert_close(logits(loaded), torch.load(tmp_path / "logits.pt"), atol=1e-4, rtol=1e-4)


def trainer_checkpoint(path, trial_params=None):
    """What Trainer's save leaves: its own adapter, its state, the optimizer."""
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"Trainer's adapter")
    (path / "optimizer.pt").write_bytes(b"optimizer state")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 3, "trial_params": trial_params}))
    return path


def test_callback_replaces_only_the_adapter_files(tmp_path):
    model = peft_model(LoraConfig(target_modules=QV, modules_to_save=["lm_head"]))
    checkpoint = trainer_checkpoint(tmp_path / "run" / "checkpoint-3")
    optimizer, folder = os.stat(checkpoint / "optimizer.pt"), os.stat(checkpoint).st_ino
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[])
    ShardSaveCallback().on_save(args, TrainerState(global_step=3), TrainerControl(), model=model)
    after = os.stat(checkpoint / "optimizer.pt")
    assert (after.st_ino, after.st_mtime_ns, after.st_nlink) == (optimizer.st_ino, optimizer.st_mtime_ns, 1)
    assert os.stat(checkpoint).st_ino == folder  # the same folder, not a republished copy
    model.save_pretrained(str(tmp_path / "theirs"))
    ours = tmp_path / "ours"
    ours.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        (ours / name).write_bytes((checkpoint / name).read_bytes())
    assert_same_files(ours, tmp_path / "theirs", model)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-3"]


def test_missing_checkpoint_is_refused_not_created(tmp_path):
    model = peft_model(LoraConfig(target_modules=QV))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[])
    with pytest.raises(FileNotFoundError, match="checkpoint for step 3 was not found"):
        ShardSaveCallback().on_save(args, TrainerState(global_step=3), TrainerControl(), model=model)
    assert not (tmp_path / "run").exists()


def test_hyperparameter_search_run_directory(tmp_path):
    """Trainer saves a trial into `output_dir/<run name>/`: by `hp_name` when given, else the run whose
    trainer state records this trial's parameters (the newest, if several do)."""
    args = SimpleNamespace(output_dir=str(tmp_path))
    named = trainer_checkpoint(tmp_path / "trial-a" / "checkpoint-3", {"lr": 0.1})
    state = TrainerState(global_step=3, is_hyper_param_search=True, trial_name="trial-a", trial_params={"lr": 0.1})
    assert trainer_checkpoint_dir(args, state) == named
    older = trainer_checkpoint(tmp_path / "run-0" / "checkpoint-3", {"lr": 0.2})
    trainer_checkpoint(tmp_path / "run-1" / "checkpoint-3", {"lr": 0.3})
    newer = trainer_checkpoint(tmp_path / "run-2" / "checkpoint-3", {"lr": 0.2})
    os.utime(older / "trainer_state.json", ns=(1, 1))
    unnamed = TrainerState(global_step=3, is_hyper_param_search=True, trial_params={"lr": 0.2})
    assert trainer_checkpoint_dir(args, unnamed) == newer
    with pytest.raises(FileNotFoundError, match="pass hp_name="):
        trainer_checkpoint_dir(args, TrainerState(global_step=3, is_hyper_param_search=True, trial_params={"lr": 9}))


def test_writer_follows_trainer(tmp_path):
    """One process: Trainer's `should_save`; save_on_each_node: the global main process only."""
    main = SimpleNamespace(world_size=1, process_index=0, should_save=True, save_on_each_node=False)
    assert trainer_writer(main) is True
    assert trainer_writer(SimpleNamespace(**{**vars(main), "should_save": False})) is False
    node_main = SimpleNamespace(world_size=1, process_index=1, should_save=True, save_on_each_node=True)
    assert trainer_writer(node_main) is False
    assert trainer_writer(SimpleNamespace(**{**vars(main), "world_size": 4})) is None  # Trainer's count differs


@pytest.mark.multirank
def test_missing_checkpoint_is_refused_on_every_rank_at_once(tmp_path):
    """Rank 0 looks for Trainer's folder and shares what it found: no rank waits for a save that cannot run."""
    results = run_ranks("callback_without_checkpoint", tmp_path)
    assert [r.result.get("type") for r in results] == ["FileNotFoundError", "RemoteError"], results[0].output[-3000:]
    assert all("checkpoint for step 3 was not found" in r.error for r in results)
    assert all(float((tmp_path / f"elapsed-{r.rank}").read_text()) < 10 for r in results)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("shards", [False, True])
def test_callback_restores_its_adapter_on_resume(tmp_path, shards):
    """Trainer restores `state.global_step` from the checkpoint before `on_train_begin`: the callback loads what it
    saved there (the adapter files, or the shard set); a fresh run (step 0) loads nothing."""
    from tiny import randomize_trainable

    trained = peft_model(LoraConfig(target_modules=QV, modules_to_save=["lm_head"]))
    trainer_checkpoint(tmp_path / "run" / "checkpoint-3")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[])
    callback = ShardSaveCallback(shards=shards)
    callback.on_save(args, TrainerState(global_step=3), TrainerControl(), model=trained)
    model = peft_model(LoraConfig(target_modules=QV, modules_to_save=["lm_head"]))
    randomize_trainable(model, seed=9)
    before = logits(model)
    callback.on_train_begin(args, TrainerState(global_step=0), TrainerControl(), model=model)
    assert torch.equal(logits(model), before)
    callback.on_train_begin(args, TrainerState(global_step=3), TrainerControl(), model=model)
    assert torch.equal(logits(model), logits(trained))
    ShardSaveCallback(resume=False).on_train_begin(args, TrainerState(global_step=3), TrainerControl(), model=model)
    # resumed from a checkpoint the callback cannot find: a warning, Trainer's own load stands
    callback.on_train_begin(args, TrainerState(global_step=7), TrainerControl(), model=model)
