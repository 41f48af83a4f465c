"""Names read from files (or given as arguments) that become paths are one plain path component: a shard header's
adapter name, a manifest's shard file name, an index's weights file name, an adapter name to read. Anything else
(`../x`, an absolute path) is refused naming the file and the name, and nothing is read or written outside the
folder it would be joined to."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from peft import LoraConfig
from tiny import base_model, files_under, peft_model

import shardsave
from shardsave.cli.merge import main
from shardsave.formats.adapter import AdapterFilesError
from shardsave.formats.shard_set import sha256_of
from shardsave.merged.offline import MergedError, merge_into
from shardsave.plan.names import adapter_dir, is_path_component
from shardsave.save.stitch import ShardSetError

QV = ["q_proj", "v_proj"]


def _rewrite_header(path: Path, edit) -> None:
    """The safetensors file with `edit(metadata)` applied to its header's metadata (tensor data unchanged)."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    edit(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])


def _update_manifest(shards: Path) -> None:
    """A manifest that vouches for the files as they now are: the header itself is what must be refused."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for f in manifest["files"]:
        path = shards / f["name"]
        f["size"], f["sha256"] = path.stat().st_size, sha256_of(path)
    (shards / "manifest.json").write_text(json.dumps(manifest))


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    """A real shard set (save_shards in one process) of two adapters, `default` and `other`."""
    root = tmp_path_factory.mktemp("set")
    model = peft_model(LoraConfig(target_modules=QV), adapters=[("other", LoraConfig(target_modules=["k_proj"]))])
    shardsave.save_shards(model, root / "shards")
    return root / "shards"


@pytest.mark.parametrize("evil", ["../x", "ABS", "..", "a/b"])
def test_adapter_name_from_a_shard_header_is_refused(shard_set, tmp_path, evil):
    evil = str(tmp_path / "abs" / "x") if evil == "ABS" else evil
    shards = tmp_path / "shards"
    shutil.copytree(shard_set, shards)
    shard = shards / "shard-00000-of-00001.safetensors"

    def rename(meta: dict) -> None:
        adapters = json.loads(meta["adapters"])
        adapters[evil] = adapters.pop("other")
        entries = json.loads(meta["entries"])
        entries = [{**e, "adapter": evil if e["adapter"] == "other" else e["adapter"]} for e in entries]
        meta["adapters"], meta["entries"] = json.dumps(adapters), json.dumps(entries)

    _rewrite_header(shard, rename)
    _update_manifest(shards)
    before = _tree(tmp_path)
    out = tmp_path / "out" / "merged"
    with pytest.raises(ShardSetError) as error:
        shardsave.merge_shards(shards, out)
    assert str(shard) in str(error.value) and repr(evil) in str(error.value)
    assert main([str(shards), "-o", str(out), "--no-progress"]) == 2
    model = peft_model(LoraConfig(target_modules=QV))
    with pytest.raises(AdapterFilesError, match="adapter name") as error:  # the same on reads
        shardsave.load_pretrained(model, shards)
    assert str(shard) in str(error.value) and repr(evil) in str(error.value)
    assert _tree(tmp_path) == before  # nothing written anywhere: not in -o, not beside it, not at the name


def test_shard_file_name_from_the_manifest_is_refused(shard_set, tmp_path):
    """A manifest naming a shard outside the set's folder is not followed there."""
    shards, elsewhere = tmp_path / "shards", tmp_path / "elsewhere"
    shutil.copytree(shard_set, shards)
    elsewhere.mkdir()
    name = "shard-00000-of-00001.safetensors"
    (shards / name).rename(elsewhere / name)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["files"][0]["name"] = f"../elsewhere/{name}"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardSetError, match="shard file name") as error:
        shardsave.merge_shards(shards, tmp_path / "out")
    assert str(shards / "manifest.json") in str(error.value) and f"'../elsewhere/{name}'" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_weights_file_name_from_a_base_index_is_refused(tmp_path):
    """`merge --into`: the base's index names its files; one outside the base folder is not read."""
    base, elsewhere, adapter = tmp_path / "base", tmp_path / "elsewhere", tmp_path / "adapter"
    base_model().save_pretrained(str(base), max_shard_size="40KB")
    peft_model(LoraConfig(target_modules=QV)).save_pretrained(str(adapter))
    index = json.loads((base / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    elsewhere.mkdir()
    (base / first).rename(elsewhere / first)
    index["weight_map"] = {k: f"../elsewhere/{f}" if f == first else f for k, f in index["weight_map"].items()}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MergedError, match="weights file name") as error:
        merge_into(adapter, base, tmp_path / "out")
    assert str(base / "model.safetensors.index.json") in str(error.value) and f"'../elsewhere/{first}'" in str(
        error.value
    )
    assert not (tmp_path / "out").exists()


def test_adapter_name_to_read_is_one_folder_of_the_source(tmp_path, capsys):
    """`--selected-adapters ../x` and `load_pretrained(adapter_name=<absolute path>)` (a live adapter's name cannot
    hold a '.') do not read the adapter outside the folder they were given."""
    saved, outside, base = tmp_path / "saved", tmp_path / "x", tmp_path / "base"
    if "." in str(outside):
        pytest.skip("the temporary folder's path holds a '.', which a live adapter's name cannot")
    model = peft_model(LoraConfig(target_modules=QV), adapters=[(str(outside), LoraConfig(target_modules=QV))])
    model.save_pretrained(str(saved), selected_adapters=["default"])
    model.save_pretrained(str(tmp_path / "tmp"), selected_adapters=["default"])
    (tmp_path / "tmp").rename(outside)  # an adapter at the absolute path the name spells
    with pytest.raises(AdapterFilesError) as error:
        shardsave.load_pretrained(model, saved, adapter_name=str(outside))
    assert str(saved) in str(error.value) and repr(str(outside)) in str(error.value)
    base_model().save_pretrained(str(base))
    out = tmp_path / "out"
    assert main([str(saved), "--into", str(base), "-o", str(out), "--selected-adapters", "default", "../x"]) == 2
    assert f"{saved}: the adapter name '../x'" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("name", ["../x", "/abs", "..", ".", "", "a/b", "a\\b", "a\x00b", "C:x"])
def test_every_adapter_written_is_a_folder_of_the_output(tmp_path, name):
    """The writers' last line of defence (save, merge, rescue all place adapters through `adapter_dir`)."""
    assert not is_path_component(name)
    with pytest.raises(ValueError, match="plain path component"):
        adapter_dir(tmp_path, name)
    assert adapter_dir(tmp_path, "default") == tmp_path
    assert adapter_dir(tmp_path, "other") == tmp_path / "other"
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("tag", ["../elsewhere", "ABS", "..", "a\x00b"])
def test_deepspeed_tag_named_by_latest_is_one_folder_of_the_save(tmp_path, tag):
    from shardsave.formats.deepspeed import DeepSpeedCheckpointError, checkpoint_dir

    tag = str(tmp_path / "elsewhere") if tag == "ABS" else tag
    save = tmp_path / "save"
    save.mkdir()
    (save / "latest").write_text(tag)
    with pytest.raises(DeepSpeedCheckpointError, match="DeepSpeed tag") as error:
        checkpoint_dir(save)
    assert str(save / "latest") in str(error.value) and repr(tag) in str(error.value)
