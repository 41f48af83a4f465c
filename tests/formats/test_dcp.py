"""Reading adapter tensors out of real torch.distributed.checkpoint folders (shardsave.formats.dcp)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from multirank import check_ok, run_ranks
from peft import LoraConfig
from tiny import peft_model
from torch.distributed.checkpoint.metadata import Metadata

from shardsave.formats.dcp import (
    DCPError,
    UnsafeMetadataError,
    canonical_keys,
    dcp_tensors,
    read_dcp_metadata,
    read_tensors,
)
from shardsave.storage import reads  # the DCP reader opens its files through the storage seam

LORA = LoraConfig(target_modules=["q_proj", "v_proj"], r=5)


def save_plain(directory: Path, state: dict) -> None:
    with warnings.catch_warnings():  # "no process group: assuming a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(directory))


@pytest.fixture
def saved(tmp_path):
    """A tiny PEFT model's whole state dict saved with dcp.save in one process, plus its adapter tensors."""
    model = peft_model(LORA)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_plain(tmp_path / "ckpt", {**state, "step": 3})
    lora = {k: v for k, v in state.items() if "lora_" in k}
    return tmp_path / "ckpt", lora


class CountingFile:
    """A file opened by the DCP reader (through storage.reads), recording every byte range it reads."""

    def __init__(self, path, ranges):
        self._f, self._path, self._ranges = open(path, "rb"), Path(path), ranges

    def seek(self, pos, whence=0):
        return self._f.seek(pos, whence)

    def readinto(self, buffer):
        start = self._f.tell()
        n = self._f.readinto(buffer)
        self._ranges.append((self._path.name, start, n))
        return n

    def read(self, n=-1):
        start = self._f.tell()
        data = self._f.read(n)
        self._ranges.append((self._path.name, start, len(data)))
        return data

    def __getattr__(self, name):  # readline, peek, ... (the .metadata pickle); counted through read only
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_reads_only_the_selected_byte_ranges(saved, monkeypatch):
    folder, lora = saved
    ranges = []
    monkeypatch.setattr(reads, "open", lambda path, mode="rb": CountingFile(path, ranges), raising=False)
    got = read_tensors(folder, list(lora))
    assert list(got) == list(lora)
    for key, value in lora.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key

    entries = dcp_tensors(folder)
    chunks = [c for k in lora for c in entries[k].chunks]
    data = [(name, start, n) for name, start, n in ranges if name.endswith(".distcp")]
    for name, start, n in data:  # every byte read lies in a selected key's record
        assert any(c.file == name and c.offset <= start and start + n <= c.offset + c.length for c in chunks), start
    read = sum(n for *_, n in data)
    distinct = len({(name, b) for name, start, n in data for b in range(start, start + n)})
    selected = sum(c.length for c in chunks)
    file_size = sum(p.stat().st_size for p in folder.glob("*.distcp"))
    print(
        f"\nread {read} bytes ({distinct} distinct) of {file_size} in the .distcp files; selected records: {selected}"
    )
    # torch.load re-reads a record's small zip headers, never anything outside the selected records
    assert distinct <= selected and read < 2 * selected and read < file_size / 2


def test_metadata_lists_tensors_without_reading_data(saved, monkeypatch):
    folder, lora = saved
    opened = []
    real_open = open
    monkeypatch.setattr(
        reads, "open", lambda p, mode="rb": opened.append(Path(p).name) or real_open(p, mode), raising=False
    )
    entries = dcp_tensors(folder)
    assert opened == [".metadata"]
    assert "step" not in entries  # a non-tensor entry
    for key, value in lora.items():
        assert entries[key].shape == tuple(value.shape) and entries[key].dtype == value.dtype
    assert isinstance(read_dcp_metadata(folder), Metadata)


def test_raw_keys_and_unknown_keys(saved):
    folder, lora = saved
    key = next(iter(lora))
    assert torch.equal(read_tensors(folder, [key], canonical=False)[key], lora[key])
    with pytest.raises(DCPError, match="no tensor for the parameter names .*lora_X"):
        read_tensors(folder, ["base_model.lora_X.weight"])


def test_canonical_keys_rule():
    accelerate = ["model.base_model.model.a.lora_A.default.weight", "model.base_model.model.b.weight"]
    assert list(canonical_keys(accelerate).values()) == [k[len("model.") :] for k in accelerate]
    nested = ["model.module._orig_mod.x._checkpoint_wrapped_module.w", "model.module.y._fsdp_wrapped_module.w"]
    assert list(canonical_keys(nested).values()) == ["x.w", "y.w"]
    own = ["model.layers.0.w", "lm_head.weight"]  # `model` is the model's own submodule here: kept
    assert canonical_keys(own) == {k: k for k in own}
    with_optim = ["model.w", "optim.state.model.w.momentum_buffer", "state.x", "param_groups.0.lr"]
    assert canonical_keys(with_optim) == {"model.w": "w"}
    with pytest.raises(DCPError, match="both name the parameter 'a.w'"):
        canonical_keys(["a.w", "a._orig_mod.w"])


def test_optimizer_and_prefixed_layout(tmp_path, saved):
    _, lora = saved
    optim = {"state": {k: {"exp_avg": torch.ones(3)} for k in list(lora)[:2]}}
    save_plain(tmp_path / "acc", {"model": {f"module.{k}": v for k, v in lora.items()}, "optim": optim})
    assert not any(k.startswith("optim.") for k in dcp_tensors(tmp_path / "acc"))
    got = read_tensors(tmp_path / "acc", list(lora))
    assert all(torch.equal(got[k], v) for k, v in lora.items())


def test_missing_metadata(tmp_path):
    tmp_path.joinpath("x.distcp").write_bytes(b"")
    with pytest.raises(DCPError, match=f"{tmp_path}: has no .metadata file"):
        read_tensors(tmp_path, ["a"])


def test_missing_data_file(saved):
    folder, lora = saved
    for path in folder.glob("*.distcp"):
        path.unlink()
    with pytest.raises(DCPError, match=r"__0_0\.distcp: missing; it holds checkpoint key '.*lora_"):
        read_tensors(folder, list(lora))


def test_truncated_data_file(saved):
    folder, lora = saved
    entries = dcp_tensors(folder)
    last = max((c.offset + c.length, k) for k in lora for c in entries[k].chunks)
    path = folder / entries[last[1]].chunks[0].file
    data = path.read_bytes()
    path.write_bytes(data[: last[0] - 10])
    with pytest.raises(DCPError, match=rf"__0_0\.distcp: truncated: .*checkpoint key '{last[1]}'"):
        read_tensors(folder, list(lora))


def test_damaged_record(saved):
    folder, lora = saved
    key = next(iter(lora))
    chunk = dcp_tensors(folder)[key].chunks[0]
    path = folder / chunk.file
    data = bytearray(path.read_bytes())
    data[chunk.offset : chunk.offset + 16] = b"\0" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(DCPError, match=rf"__0_0\.distcp \(checkpoint key '{key}'.*not a readable torch.save record"):
        read_tensors(folder, [key])


def edit_metadata(folder: Path, edit) -> None:
    """Rewrite .metadata (the test's own trusted file) after `edit(metadata)`."""
    path = folder / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    edit(metadata)
    path.write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("how", ["dropped", "duplicated"])
def test_chunks_must_cover_once(saved, how):
    folder, lora = saved
    key = next(iter(lora))

    def edit(metadata):
        chunks = metadata.state_dict_metadata[key].chunks
        if how == "dropped":
            chunks.clear()
        else:
            chunks.append(chunks[0])

    edit_metadata(folder, edit)
    problem = "cover 0 of" if how == "dropped" else "overlap"
    with pytest.raises(DCPError, match=rf"checkpoint key '{key}': .*{problem}"):
        read_tensors(folder, [key])


class Touch:
    """Pickles as a call of pathlib.Path.touch: a foreign global from an otherwise allowed module."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_foreign_global_is_refused_not_run(saved, tmp_path):
    folder, _ = saved
    marker = tmp_path / "ran"
    edit_metadata(folder, lambda metadata: setattr(metadata, "planner_data", Touch(marker)))
    with pytest.raises(UnsafeMetadataError, match=r"\.metadata: refers to pathlib\.Path\.touch"):
        read_tensors(folder, [])
    assert not marker.exists()
    (folder / ".metadata").write_bytes(pickle.dumps({"x": print}))
    with pytest.raises(UnsafeMetadataError, match="refers to builtins.print"):
        read_dcp_metadata(folder)


def test_build_on_a_class_is_refused(tmp_path):
    """pickle's BUILD can set attributes on any object on its stack; on an allowed class itself it is refused."""
    payload = (
        b"\x80\x04c" + b"torch.distributed.checkpoint.metadata\nMetadata\n"
        b"N}\x8c\x07version\x8c\x03bads\x86b."  # BUILD (None, {"version": "bad"}) on the class
    )
    tmp_path.joinpath(".metadata").write_bytes(payload)
    with pytest.raises(UnsafeMetadataError, match="asks to set the attributes of <class"):
        read_dcp_metadata(tmp_path)
    assert Metadata.version is None


@pytest.mark.multirank
def test_fsdp2_dcp_save_read_back(tmp_path):
    """2 gloo ranks: FSDP2 training step, dcp.save of get_model_state_dict (plain and as accelerate writes it,
    with the optimizer); the adapter tensors read back equal the natively gathered ones."""
    check_ok(run_ranks("dcp_save", tmp_path, lora={"target_modules": ["q_proj", "v_proj"], "r": 5}))
    expected = torch.load(tmp_path / "lora.pt", weights_only=True)
    assert len(expected) == 8
    entries = dcp_tensors(tmp_path / "dcp")
    assert all(len(entries[k].chunks) == 2 for k in expected)  # really sharded (r=5: rows 3 + 2 for lora_A)
    for folder in ("dcp", "pytorch_model_fsdp_0"):
        got = read_tensors(tmp_path / folder, list(expected))
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), (folder, key)
    prefixed = dcp_tensors(tmp_path / "pytorch_model_fsdp_0")
    assert any(k.startswith("optim.") for k in read_dcp_metadata(tmp_path / "pytorch_model_fsdp_0").state_dict_metadata)
    assert all(k.startswith("model.") for k in prefixed)


def test_rescue_from_every_dcp_layout(tmp_path):
    """2 gloo ranks, FSDP2: the adapter rescued from the plain DCP folder, from accelerate's pytorch_model_fsdp_0/
    (keys under `model.`, with the optimizer), from an adapter-only save under wrapper prefixes (`module.`,
    `_orig_mod.`, `_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`), from FSDP1's SHARDED_STATE_DICT, and from the
    Trainer-style checkpoint folder holding them (whose broken adapter_model.safetensors is not used) is what
    shardsave.save_pretrained wrote from the live model; the output passes verify, the broken file does not."""
    from rescue_checks import rescue, same_files

    from shardsave.checks.verify import verify_adapter

    check_ok(run_ranks("dcp_save", tmp_path, lora={"target_modules": ["q_proj", "v_proj"], "r": 5}))
    base = tmp_path / "base"
    for source in ("dcp", "pytorch_model_fsdp_0", "dcp_adapter", "."):
        out = tmp_path.parent / f"{tmp_path.name}-out-{source.strip('.') or 'checkpoint'}"
        code, err = rescue(tmp_path / source, "-o", out, "--base", base)
        assert code == 0, (source, err)
        same_files(tmp_path / "reference", out)
        assert verify_adapter(out).sound
    code, err = rescue(tmp_path / "fsdp1", "-o", tmp_path.parent / f"{tmp_path.name}-fsdp1", "--base", base)
    assert code == 0, err
    same_files(tmp_path / "reference_fsdp1", tmp_path.parent / f"{tmp_path.name}-fsdp1")
    # the recipe for a broken checkpoint-N/: its adapter files replaced in place, the checkpoint untouched
    assert not verify_adapter(tmp_path).sound
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.distcp")}
    assert rescue(tmp_path, "-o", tmp_path, "--base", base)[0] == 2  # not without --overwrite
    code, err = rescue(tmp_path, "-o", tmp_path, "--base", base, "--overwrite")
    assert code == 0, err
    assert verify_adapter(tmp_path).sound
    reference = tmp_path / "reference" / "adapter_model.safetensors"
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == reference.read_bytes()
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*.distcp")}
    code, err = rescue(tmp_path / "dcp", "-o", tmp_path / "dcp", "--base", base, "--overwrite")
    assert code == 2 and "would replace the checkpoint" in err
