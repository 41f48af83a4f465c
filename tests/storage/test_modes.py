"""Permissions: what shardsave publishes has the modes PEFT's own save gives under the same umask, so the
group, an evaluation job or an inference server running as another user can read it when PEFT's could."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from peft import LoraConfig
from tiny import peft_model

import shardsave
from shardsave.storage import local

QV = ["q_proj", "v_proj"]


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=lambda u: f"umask{u:03o}")
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *sorted(root.rglob("*"))]}


def open_mode_for_weights(peft_modes: dict[str, int], weights_modes: dict[str, int]) -> dict[str, int]:
    """PEFT's modes, but the weights with the mode a plain `open` gives (`weights_modes`): safetensors >= 0.8
    renames a 0600 temporary file into place whatever the umask (safetensors#782); shardsave does not follow
    that regression, so that the group can read the adapter as it can PEFT's config and card."""
    out = dict(peft_modes)
    for rel, mode in weights_modes.items():
        assert rel in out
        out[rel] = mode
    return out


def two_adapters():
    return peft_model(LoraConfig(target_modules=QV), adapters=[("other", LoraConfig(target_modules=["q_proj"]))])


@pytest.mark.parametrize("swap", ["exchange", "two-renames"])
def test_new_adapter_has_peft_modes(tmp_path, umask, swap, monkeypatch):
    if swap == "two-renames":
        monkeypatch.setattr(local, "rename_exchange", lambda a, b: False)
    model = two_adapters()
    model.save_pretrained(str(tmp_path / "theirs"), selected_adapters=["default", "other"])
    shardsave.save_pretrained(model, tmp_path / "ours", selected_adapters=["default", "other"])
    new_file = 0o666 & ~umask
    theirs = modes(tmp_path / "theirs")
    weights = {"adapter_model.safetensors": new_file, "other/adapter_model.safetensors": new_file}
    assert modes(tmp_path / "ours") == open_mode_for_weights(theirs, weights)
    assert theirs["."] == 0o777 & ~umask and theirs["adapter_config.json"] == new_file


def test_replaced_adapter_keeps_its_modes_like_peft(tmp_path, umask):
    """PEFT overwrites in place, so whatever it replaces keeps its mode; new files get the umask's."""
    model = two_adapters()
    for name in ("ours", "theirs"):
        d = tmp_path / name
        model.save_pretrained(str(d), safe_serialization=False, selected_adapters=["default", "other"])
        (d / "adapter_model.safetensors").write_bytes(b"")  # will be replaced
        for rel, mode in {".": 0o2750, "other": 0o700, "adapter_model.safetensors": 0o640, "README.md": 0o604,
                          "other/adapter_config.json": 0o600, "adapter_model.bin": 0o660}.items():  # fmt: skip
            os.chmod(d / rel, mode)
    model.save_pretrained(str(tmp_path / "theirs"), selected_adapters=["default", "other"])
    shardsave.save_pretrained(model, tmp_path / "ours", selected_adapters=["default", "other"])
    theirs = modes(tmp_path / "theirs")
    for stale in ("adapter_model.bin", "other/adapter_model.bin"):  # PEFT leaves the other format; shardsave not
        del theirs[stale]
    weights = {"adapter_model.safetensors": 0o640, "other/adapter_model.safetensors": 0o666 & ~umask}
    assert modes(tmp_path / "ours") == open_mode_for_weights(theirs, weights)
    assert theirs["."] == 0o2750 and theirs["README.md"] == 0o604


def test_shard_files_and_manifest_have_new_file_modes(tmp_path, umask):
    shardsave.save_shards(peft_model(LoraConfig(target_modules=QV)), tmp_path / "shards")
    got = modes(tmp_path / "shards")
    assert got == {".": 0o777 & ~umask, "shard-00000-of-00001.safetensors": 0o666 & ~umask,
                   "manifest.json": 0o666 & ~umask}  # fmt: skip


def test_atomic_file_keeps_the_mode_of_the_file_it_replaces(tmp_path, umask):
    path = tmp_path / "manifest.json"
    local.atomic_file(path, lambda tmp: tmp.write_text("a"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    os.chmod(path, 0o640)
    local.atomic_file(path, lambda tmp: tmp.write_text("b"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
