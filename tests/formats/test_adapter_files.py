"""The reader behind load_pretrained (`shardsave.formats.adapter`): one open per file per load (issue 23, item 12),
and a shard set opened from the index another rank made while verifying it (item 11), which must refuse any file
that is not the one verified."""

from __future__ import annotations

import builtins
import json
import os
from collections import Counter

import pytest
import torch
from peft import LoraConfig
from tiny import peft_model, randomize_trainable

import shardsave

LORA = LoraConfig(target_modules=["q_proj", "v_proj"])


def trained():
    model = peft_model(LORA)
    randomize_trainable(model, seed=4)
    return model


def test_a_load_opens_the_weights_file_once_for_its_header_and_once_for_every_read(tmp_path, monkeypatch):
    shardsave.save_pretrained(trained(), tmp_path / "adapter")
    weights = os.path.abspath(tmp_path / "adapter" / "adapter_model.safetensors")
    counts: Counter = Counter()
    py_open, os_open = builtins.open, os.open

    def counting(original):
        def spy(path, *args, **kwargs):
            counts[os.path.abspath(os.fspath(path)) if isinstance(path, str | os.PathLike) else ""] += 1
            return original(path, *args, **kwargs)

        return spy

    monkeypatch.setattr(builtins, "open", counting(py_open))
    monkeypatch.setattr(os, "open", counting(os_open))
    model = peft_model(LORA)
    shardsave.load_pretrained(model, tmp_path / "adapter")
    monkeypatch.undo()
    assert counts[weights] == 2, counts  # the header, then one descriptor for all 8 tensors (was 1 + 8)
    assert all(torch.equal(p, dict(trained().named_parameters())[n]) for n, p in model.named_parameters())


def test_a_shard_set_read_through_another_ranks_index(tmp_path):
    from shardsave.formats.adapter import AdapterFilesError, open_adapter, open_indexed, shard_index

    shardsave.save_shards(trained(), tmp_path / "shards")  # one process: one shard
    verifier = open_adapter(tmp_path / "shards")
    index = json.loads(json.dumps(shard_index(verifier)))  # what travels through the store
    reader = open_indexed(tmp_path / "shards", index)
    assert reader.opened() == []  # nothing but the manifest until a range is read
    for key, spec in verifier.specs.items():
        numel = spec.nbytes // spec.dtype.itemsize
        assert torch.equal(reader.read(key, 1, numel - 1), verifier.read(key, 1, numel - 1)), key
    assert [p.name for p in reader.opened()] == ["shard-00000-of-00001.safetensors"]
    reader.close()
    verifier.close()

    shard = tmp_path / "shards" / "shard-00000-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: same size, a later mtime, another checksum
    shard.write_bytes(bytes(data))
    key = next(iter(verifier.specs))
    with pytest.raises(AdapterFilesError, match="checksum differs from the manifest"):
        open_indexed(tmp_path / "shards", index).read(key, 0, 1)
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(AdapterFilesError, match="rewritten since"):
        open_indexed(tmp_path / "shards", index).read(key, 0, 1)
    manifest = tmp_path / "shards" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"world_size"', '"world_size" ', 1))
    with pytest.raises(AdapterFilesError, match="differs from the one rank 0 verified"):
        open_indexed(tmp_path / "shards", index)


def test_the_index_of_a_regular_layout_stays_small():
    """The runs of 448 tensors split over 1024 ranks (a ZeRO-3 set, 458752 runs) in a few KiB."""
    from shardsave.formats import shard_index as adapter_files

    rows = [(k, f, f * 1000, (f + 1) * 1000) for k in range(448) for f in range(1024)]
    packed = adapter_files._pack(rows, 4)
    assert adapter_files._unpack(packed, 4) == rows
    assert len(packed) < 16 * 1024, len(packed)


def test_the_index_reads_the_adapter_it_names_when_a_set_holds_two_under_the_same_keys(tmp_path):
    from shardsave.formats.adapter import open_adapter, open_indexed, shard_index

    model = peft_model(LORA, adapters=[("other", LORA)])
    randomize_trainable(model, seed=5)
    shardsave.save_shards(model, tmp_path / "shards")
    for name in ("default", "other"):
        verifier = open_adapter(tmp_path / "shards", name)
        reader = open_indexed(tmp_path / "shards", json.loads(json.dumps(shard_index(verifier))))
        live = {k: v for k, v in model.named_parameters() if f".{name}." in k}
        for key, spec in verifier.specs.items():
            numel = spec.nbytes // spec.dtype.itemsize
            got = reader.read(key, 0, numel)
            assert torch.equal(got, verifier.read(key, 0, numel)), (name, key)
            assert torch.equal(got, live[key.replace(".weight", f".{name}.weight")].reshape(-1)), (name, key)
