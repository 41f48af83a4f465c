"""`replace_adapter_files`: the adapter's files are replaced one by one, each atomically, inside a directory
that holds much else (a Trainer checkpoint); everything else there stays as it was, not even fsynced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig
from tiny import assert_same_files, peft_model

import shardsave
from shardsave.storage import local
from shardsave.storage.owner import owner_tag
from shardsave.storage.stale import TMP_MARK

QV = ["q_proj", "v_proj"]
OTHERS = ["optimizer.pt", "trainer_state.json", "global_step3/zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def checkpoint(root: Path) -> Path:
    """What Trainer leaves: its (wrong) adapter in the other format, a card, optimizer and DeepSpeed files."""
    root.mkdir()
    for rel in OTHERS:
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_bytes(b"large state " + rel.encode())
    (root / "adapter_model.bin").write_bytes(b"Trainer's adapter")
    (root / "adapter_config.json").write_text("{}")
    (root / "README.md").write_text("card")
    return root


def identity(root: Path) -> dict[str, tuple[int, ...]]:
    """Inode, mtime and link count of Trainer's files, and the inode of the folders (a republished directory
    would be a new one)."""
    files = {rel: (s.st_ino, s.st_mtime_ns, s.st_nlink) for rel in OTHERS for s in [os.stat(root / rel)]}
    return files | {f"{d}/": (os.stat(root / d).st_ino,) for d in (".", "global_step3")}


def fill_new(tmp: Path) -> None:
    (tmp / "README.md").write_text("new card")
    (tmp / "adapter_config.json").write_text('{"new": 1}')
    (tmp / "adapter_model.safetensors").write_bytes(b"new weights")
    (tmp / "second").mkdir()
    (tmp / "second" / "adapter_config.json").write_text('{"second": 1}')
    (tmp / "second" / "adapter_model.safetensors").write_bytes(b"second weights")


def hidden(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_replaces_adapter_files_only(tmp_path, monkeypatch):
    root = checkpoint(tmp_path / "checkpoint-3")
    before = identity(root)
    synced = []
    real_fsync = local.fsync
    monkeypatch.setattr(local, "fsync", lambda path: (synced.append(Path(path)), real_fsync(path)))
    assert local.replace_adapter_files(root, fill_new) == root
    assert identity(root) == before  # same inode, same mtime, no extra hard link
    assert (root / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert (root / "README.md").read_text() == "new card"
    assert (root / "second" / "adapter_model.safetensors").read_bytes() == b"second weights"
    assert not (root / "adapter_model.bin").exists()  # the stale other format
    assert hidden(root) == [] and hidden(tmp_path) == []
    assert not {root / rel for rel in OTHERS} & set(synced)
    assert not any(p.is_relative_to(root / "global_step3") for p in synced)


def test_failure_while_filling_leaves_previous_files(tmp_path):
    root = checkpoint(tmp_path / "checkpoint-3")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def half(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text('{"new": 1}')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        local.replace_adapter_files(root, half)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert hidden(root) == []


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        local.replace_adapter_files(tmp_path / "nowhere", fill_new)
    assert not (tmp_path / "nowhere").exists()


def test_stale_temporary_of_a_dead_writer_is_removed(tmp_path):
    root = checkpoint(tmp_path / "checkpoint-3")
    code = "from shardsave.storage.owner import owner_tag; print(owner_tag())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    stale, alive = f"{TMP_MARK}{dead}0123abcd", f"{TMP_MARK}{owner_tag()}4567cdef"
    for name in (stale, alive):
        (root / name).mkdir()
    local.replace_adapter_files(root, fill_new)
    assert hidden(root) == [alive]


def test_save_pretrained_replace_files_only_matches_peft(tmp_path):
    """The adapter files are PEFT's; Trainer's other files keep their inodes (publish would re-link them)."""
    model = peft_model(LoraConfig(target_modules=QV, modules_to_save=["lm_head"]))
    root = checkpoint(tmp_path / "checkpoint-3")
    (root / "README.md").unlink()  # PEFT updates an existing card: compare against a fresh one
    before = identity(root)
    shardsave.save_pretrained(model, root, replace_files_only=True)
    assert identity(root) == before
    model.save_pretrained(str(tmp_path / "theirs"))
    ours = tmp_path / "ours"
    ours.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        (ours / name).write_bytes((root / name).read_bytes())
    assert_same_files(ours, tmp_path / "theirs", model)
    assert not (root / "adapter_model.bin").exists()
