"""Atomic publish: a failure leaves the destination as it was; a save replaces the adapter whole."""

from __future__ import annotations

import os

import pytest
from peft import LoraConfig
from tiny import assert_same_files, peft_model

import shardsave
from shardsave import writer

QV = ["q_proj", "v_proj"]


@pytest.fixture(autouse=True, params=["exchange", "two-renames"])
def swap(request, monkeypatch):
    """Every test runs with the atomic exchange and with the fallback for systems without it."""
    if request.param == "two-renames":
        monkeypatch.setattr(writer, "_rename_exchange", lambda a, b: False)
    return request.param


def leftovers(parent):
    return [p.name for p in parent.iterdir() if writer.TMP_MARK in p.name or writer.OLD_MARK in p.name]


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_failure_while_writing_leaves_previous_adapter(tmp_path, monkeypatch):
    model = peft_model(LoraConfig(target_modules=QV))
    dest = tmp_path / "adapter"
    shardsave.save_pretrained(model, dest)
    before = snapshot(dest)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shardsave.save.write_config", boom)
    with pytest.raises(shardsave.SaveError, match="No space left on device.*Nothing was published") as info:
        shardsave.save_pretrained(peft_model(LoraConfig(target_modules=QV), seed=5), dest)
    assert isinstance(info.value.__cause__, OSError)
    assert snapshot(dest) == before
    assert leftovers(tmp_path) == []


def test_failure_on_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("shardsave.save.write_weights", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
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


def test_stale_leftovers_of_a_dead_writer_are_removed(tmp_path):
    """What a killed writer left (its hidden directory, or the previous adapter it was swapping out) is removed
    by the next save; a live process's and another host's are not."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = writer.owner_tag().split("-")[1]
    names = [
        f".adapter{writer.TMP_MARK}{dead_pid}-{host}-abc",  # dead writer: removed
        f".adapter{writer.OLD_MARK}{dead_pid}-{host}-def",  # dead writer: removed
        f".adapter{writer.TMP_MARK}{os.getpid()}-{host}-ghi",  # alive (this process): kept
        f".adapter{writer.TMP_MARK}{dead_pid}-00000000-jkl",  # another host: kept
        f".other{writer.TMP_MARK}{dead_pid}-{host}-mno",  # another destination: kept
    ]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    shardsave.save_pretrained(peft_model(LoraConfig(target_modules=QV)), tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(names[2:])
