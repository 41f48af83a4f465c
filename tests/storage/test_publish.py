"""Atomic publish: a failure leaves the destination as it was; a save replaces the adapter whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig
from tiny import assert_same_files, peft_model

import shardsave
from shardsave.storage import local, stale
from shardsave.storage.owner import UNKNOWN_SPACE, Owner, space_key, space_parts

QV = ["q_proj", "v_proj"]


@pytest.fixture(autouse=True, params=["exchange", "two-renames"])
def swap(request, monkeypatch):
    """Every test runs with the atomic exchange and with the fallback for systems without it."""
    if request.param == "two-renames":
        monkeypatch.setattr(local, "rename_exchange", lambda a, b: False)
    return request.param


def leftovers(parent):
    return [p.name for p in parent.iterdir() if stale.TMP_MARK in p.name or stale.OLD_MARK in p.name]


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_failure_while_writing_leaves_previous_adapter(tmp_path, monkeypatch):
    model = peft_model(LoraConfig(target_modules=QV))
    dest = tmp_path / "adapter"
    shardsave.save_pretrained(model, dest)
    before = snapshot(dest)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shardsave.formats.texts.write_config", boom)
    with pytest.raises(shardsave.SaveError, match="No space left on device.*Nothing was published") as info:
        shardsave.save_pretrained(peft_model(LoraConfig(target_modules=QV), seed=5), dest)
    assert isinstance(info.value.__cause__, OSError)
    assert snapshot(dest) == before
    assert leftovers(tmp_path) == []


def test_failure_on_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("shardsave.save.gathered.write_weights", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(shardsave.SaveError, match="disk"):
        shardsave.save_pretrained(peft_model(LoraConfig(target_modules=QV)), tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_existing_adapter_replaced_whole_other_files_kept(tmp_path):
    model = peft_model(LoraConfig(target_modules=QV))
    dest, theirs = tmp_path / "adapter", tmp_path / "theirs"
    for d in (dest, theirs):
        model.save_pretrained(str(d), safe_serialization=False)  # an older .bin adapter
        (d / "trainer_state.json").write_text("{}")
        (d / "optimizer").mkdir()
        (d / "optimizer" / "rank0.pt").write_bytes(b"state")
    shardsave.save_pretrained(model, dest)
    model.save_pretrained(str(theirs))
    assert not (dest / "adapter_model.bin").exists()  # the stale format is gone: one coherent adapter
    assert (dest / "trainer_state.json").read_text() == "{}"
    assert (dest / "optimizer" / "rank0.pt").read_bytes() == b"state"
    assert (dest / "README.md").read_bytes() == (theirs / "README.md").read_bytes()  # card updated like PEFT
    (theirs / "adapter_model.bin").unlink()
    assert_same_files(dest, theirs, model)
    assert leftovers(tmp_path) == []


def test_model_folder_publish_drops_every_weights_file_of_the_previous_save(tmp_path):
    """A model folder (merged weights) keeps no weights file or index of the previous save beside the new ones,
    whichever way it was sharded; an adapter folder keeps its rule (only its other format goes)."""
    dest = tmp_path / "model"
    old = ["model.safetensors", "model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors",
           "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model-00001-of-00002.bin",
           "pytorch_model.bin.index.json", "model.fp16.safetensors", "adapter_model.safetensors",
           "adapter_config.json", "config.json", "tokenizer.json", "README.md", "sub/model.safetensors"]  # fmt: skip
    for name in old:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text("old")
    new = {"config.json": "new", "model-00001-of-00002.safetensors": "new", "model-00002-of-00002.safetensors": "new",
           "model.safetensors.index.json": "new"}  # fmt: skip
    local.publish(dest, lambda tmp: [(tmp / k).write_text(v) for k, v in new.items()])
    kept = {"tokenizer.json": "old", "README.md": "old", "sub/model.safetensors": "old"}
    assert snapshot(dest) == {k: v.encode() for k, v in {**new, **kept}.items()}
    local.publish(dest, lambda tmp: [(tmp / k).write_text("single") for k in ("config.json", "model.safetensors")])
    assert sorted(snapshot(dest)) == sorted(["config.json", "model.safetensors", *kept])

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_model.bin", "model.safetensors", "config.json"):
        (adapter / name).write_text("old")
    files = ("adapter_config.json", "adapter_model.safetensors")
    local.publish(adapter, lambda tmp: [(tmp / k).write_text("new") for k in files])
    assert sorted(snapshot(adapter)) == sorted(["config.json", "model.safetensors", *files])
    assert leftovers(tmp_path) == []


def test_existing_readme_is_updated_not_replaced(tmp_path):
    model = peft_model(LoraConfig(target_modules=QV))
    dest, theirs = tmp_path / "ours", tmp_path / "theirs"
    for d in (dest, theirs):
        d.mkdir()
        (d / "README.md").write_text("---\nlicense: mit\n---\n\n# My adapter\n\nNotes the user wrote.\n")
    shardsave.save_pretrained(model, dest)
    model.save_pretrained(str(theirs))
    assert (dest / "README.md").read_bytes() == (theirs / "README.md").read_bytes()
    assert "Notes the user wrote." in (dest / "README.md").read_text()


def test_save_into_working_directory(tmp_path, monkeypatch):
    model = peft_model(LoraConfig(target_modules=QV))
    monkeypatch.chdir(tmp_path)
    shardsave.save_pretrained(model, ".")
    model.save_pretrained(str(tmp_path / "theirs"))
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "theirs" / "adapter_model.safetensors"
    ).read_bytes()
    assert os.getcwd() == str(tmp_path)


def test_path_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="should be a directory, not a file"):
        shardsave.save_pretrained(peft_model(LoraConfig(target_modules=QV)), target)
    assert target.read_text() == "x"


def dead_writer() -> Owner:
    """The owner tag of a process that has exited (and been reaped)."""
    code = "import os; print(os.getpid())"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    start = int(Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[19])
    proc.wait()
    return Owner(pid, start, Owner.current().space)


def test_stale_leftovers_of_a_dead_writer_are_removed(tmp_path):
    """What a killed writer left (its hidden directory, or the previous adapter it was swapping out) is removed
    by the next save; a live process's, another container's, an earlier version's and a user's are not."""
    dead, here = dead_writer(), Owner.current()
    container = Owner(dead.pid, dead.start, space_key((*space_parts()[:2], "4:4026532000", space_parts()[3])))
    names = [
        f".adapter{stale.TMP_MARK}{dead.tag}0123abcd",  # dead writer: removed
        f".adapter{stale.OLD_MARK}{dead.tag}4567cdef",  # dead writer: removed
        f".adapter{stale.TMP_MARK}{here.tag}89abcdef",  # alive (this process): kept
        f".adapter{stale.TMP_MARK}{Owner(here.pid, here.start, UNKNOWN_SPACE).tag}01234567",  # unknown: kept
        f".adapter{stale.TMP_MARK}{container.tag}89012345",  # another pid namespace (container): kept
        f".adapter{stale.TMP_MARK}{dead.pid}-{'0' * 8}-abc12345",  # an earlier version's format: kept
        f".adapter{stale.TMP_MARK}{dead.tag}my-backup",  # not a name shardsave makes: kept
        f".other{stale.TMP_MARK}{dead.tag}abcdef01",  # another destination: kept
    ]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    shardsave.save_pretrained(peft_model(LoraConfig(target_modules=QV)), tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(names[2:])


def test_previous_adapter_that_cannot_be_put_back_is_kept(tmp_path, monkeypatch):
    aside = tmp_path / f".adapter{stale.OLD_MARK}{dead_writer().tag}0123abcd"
    aside.mkdir()
    (aside / "adapter_config.json").write_text("{}")

    def refuse(a, b):
        raise PermissionError(13, "Permission denied", str(a))

    monkeypatch.setattr(stale, "rename_noreplace", refuse)
    assert stale.remove_stale(tmp_path / "adapter") == []
    assert (aside / "adapter_config.json").read_text() == "{}"


def test_previous_adapter_moved_aside_by_a_dead_writer_is_put_back(tmp_path):
    """A writer killed between its two renames left no destination and the previous adapter moved aside: the
    next cleanup puts it back (it is the only complete adapter) rather than removing it."""
    model = peft_model(LoraConfig(target_modules=QV))
    dest = tmp_path / "adapter"
    model.save_pretrained(str(dest))
    (dest / "trainer_state.json").write_text("{}")
    before = snapshot(dest)
    aside = tmp_path / f".adapter{stale.OLD_MARK}{dead_writer().tag}0123abcd"
    dest.rename(aside)
    assert stale.remove_stale(dest) == []
    assert snapshot(dest) == before and leftovers(tmp_path) == []

    dest.rename(aside)  # and a save in that state keeps the other files of the directory
    shardsave.save_pretrained(peft_model(LoraConfig(target_modules=QV), seed=3), dest)
    assert (dest / "trainer_state.json").read_text() == "{}" and leftovers(tmp_path) == []
