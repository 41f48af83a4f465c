"""shardsave.load_pretrained: resume across backends and world sizes, reading only what each rank holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from multirank import check_ok, run_ranks
from peft import LoraConfig
from tiny import logits, peft_model, randomize_trainable

import shardsave
from shardsave.formats.adapter import AdapterFilesError
from shardsave.load.pretrained import AdapterMismatchError, compare_configs

BACKENDS = ["ddp", "zero2", "zero3", "fsdp1", "fsdp1_flat", "fsdp2"]
LORA = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
#: [saved under, loaded under, from]: every backend saves and loads once; from save_pretrained's folder, the
#: shard set (no merge) and PEFT's own save.
ON_THREE = [
    ["ddp", "fsdp2", "adapter"],
    ["zero2", "zero3", "shards"],
    ["zero3", "fsdp1", "adapter"],
    ["fsdp1", "zero2", "shards"],
    ["fsdp1_flat", "ddp", "adapter"],
    ["fsdp2", "fsdp1_flat", "theirs"],
]
#: zero3_persist: DeepSpeed's default stage3_param_persistence_threshold keeps the small LoRA tensors gathered on
#: every rank beside their partitions and fp32 masters: all three are written.
ON_TWO = [["zero3", "fsdp2", "shards"], ["fsdp2", "zero3_persist", "adapter"]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Each backend trained on 2 gloo ranks and saved (folder, shards, PEFT's save, the trained logits)."""
    out = tmp_path_factory.mktemp("load")
    check_ok(run_ranks("load_matrix", out, limit=600, phase="save", backends=BACKENDS))
    return out


def check_loads(saved: Path, pairs: list[list[str]], world: int) -> None:
    for i, (source, backend, _) in enumerate(pairs):
        want = torch.load(saved / source / "logits.pt")
        for rank in range(world):
            record = torch.load(saved / f"load-{i}-{rank}.pt")
            where = (source, backend, rank)
            assert not torch.allclose(record["before"], want, atol=1e-3), where  # the fresh model differs
            torch.testing.assert_close(record["after"], want, atol=1e-5, rtol=1e-5, msg=str(where))
            assert torch.equal(record["stepped"], record["after"]), where  # an lr=0 step keeps them (DS masters)
            assert record["unexpected"] == [] and record["missing"] > 0, where  # the base's entries, as PEFT says
            assert "r: saved 2, model 8" in (record["refused"] or ""), where  # refused on every rank ...
            assert torch.equal(record["after_refused"], record["stepped"]), where  # ... and nothing written


@pytest.mark.multirank
def test_saved_on_two_loaded_on_three(saved):
    check_ok(run_ranks("load_matrix", saved, world_size=3, limit=600, phase="load", pairs=ON_THREE))
    check_loads(saved, ON_THREE, 3)


@pytest.mark.multirank
def test_saved_on_two_loaded_on_two_under_another_backend(saved):
    check_ok(run_ranks("load_matrix", saved, limit=600, phase="load", pairs=ON_TWO))
    check_loads(saved, ON_TWO, 2)


@pytest.mark.parametrize("source, via", [("zero3", "adapter"), ("fsdp2", "shards"), ("fsdp1", "theirs")])
def test_saved_on_two_loaded_in_one_process(saved, source, via):
    model = peft_model(LORA)
    randomize_trainable(model, seed=9)
    want = torch.load(saved / source / "logits.pt")
    assert not torch.allclose(logits(model), want, atol=1e-3)
    result = shardsave.load_pretrained(model, saved / source / via)
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)
    assert result.unexpected_keys == [] and "base_model.model.model.embed_tokens.weight" in result.missing_keys


def fresh() -> torch.nn.Module:
    model = peft_model(LORA)
    randomize_trainable(model, seed=9)
    return model


def test_bin_needs_allow_pickle_and_strict_false_loads_what_fits(tmp_path):
    trained = peft_model(LORA)
    trained.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    model = fresh()
    with pytest.raises(AdapterFilesError, match="allow_pickle=True"):
        shardsave.load_pretrained(model, tmp_path / "bin")
    shardsave.load_pretrained(model, tmp_path / "bin", allow_pickle=True)
    torch.testing.assert_close(logits(model), logits(trained))

    # a file with one tensor too few and one too many
    from safetensors.torch import load_file, save_file

    shardsave.save_pretrained(trained, tmp_path / "partial")
    tensors = load_file(tmp_path / "partial" / "adapter_model.safetensors")
    dropped = next(k for k in tensors if "lora_B" in k)
    tensors.pop(dropped)
    tensors["base_model.model.nowhere.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "partial" / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = fresh()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterMismatchError, match=r"missing \[.*lora_B.*unexpected \['base_model.model.nowhere"):
        shardsave.load_pretrained(model, tmp_path / "partial")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing written
    result = shardsave.load_pretrained(model, tmp_path / "partial", strict=False)
    assert result.unexpected_keys == ["base_model.model.nowhere.weight"]
    source = dropped.replace(".weight", ".default.weight")
    assert source in result.missing_keys
    assert torch.equal(dict(model.named_parameters())[source], before[source])  # the dropped one kept its value


def test_non_default_adapter_and_bad_paths(tmp_path):
    other = LoraConfig(target_modules=["k_proj"], r=2)
    trained = peft_model(LORA, adapters=[("extra", other)])
    shardsave.save_pretrained(trained, tmp_path / "both")  # default at the root, extra/ beside it
    model = peft_model(LORA, adapters=[("extra", other)])
    randomize_trainable(model, seed=9)
    shardsave.load_pretrained(model, tmp_path / "both", adapter_name="extra")
    shardsave.load_pretrained(model, tmp_path / "both")
    assert all(
        torch.equal(p, dict(trained.named_parameters())[n]) for n, p in model.named_parameters() if p.requires_grad
    )
    with pytest.raises(AdapterFilesError, match="does not exist"):
        shardsave.load_pretrained(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFilesError, match="python -m shardsave.merge"):
        shardsave.load_pretrained(model, tmp_path / "empty")
    with pytest.raises(AdapterMismatchError, match="no adapter 'nope'"):
        shardsave.load_pretrained(model, tmp_path / "both", adapter_name="nope")
    shutil.copytree(tmp_path / "both", tmp_path / "wide")
    config = json.loads((tmp_path / "wide" / "adapter_config.json").read_text())
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 99, "use_dora": True}))
    with pytest.raises(AdapterMismatchError, match="lora_alpha: saved 99, model 8; use_dora: saved True, model"):
        shardsave.load_pretrained(model, tmp_path / "wide")


def test_compare_configs_is_a_pure_field_by_field_check():
    live = LoraConfig(target_modules={"v_proj", "q_proj"}, r=8).to_dict()
    saved = json.loads(json.dumps({**live, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}))
    assert compare_configs(saved, live) == []  # a set and a list of the same names; an enum and its value
    assert compare_configs({**saved, "rank_pattern": None}, {**live, "rank_pattern": {}}) == []
    assert compare_configs({**saved, "r": 4, "rank_pattern": {"q_proj": 2}}, live) == [
        "r: saved 4, model 8",
        "rank_pattern: saved {'q_proj': 2}, model None",
    ]


def test_zero3_master_is_the_read_itself_when_unpadded():
    """A ZeRO-3 rank's fp32 read of its partition is the master it writes: no second buffer of its share (the
    per-rank memory goal, <= 2x the share, benchmarks/load.py); a padded partition still gets a zero-filled one."""
    from types import SimpleNamespace

    from shardsave.load import writes as load_module

    files = SimpleNamespace(read=lambda key, start, stop: torch.arange(start, stop, dtype=torch.float32))
    for numel, padded in ((8, 8), (7, 8)):
        collector = SimpleNamespace(slices=lambda name: [], partition=lambda name, numel=numel: (0, numel))
        param = SimpleNamespace(
            ds_id=0, ds_numel=numel, ds_tensor=torch.zeros(padded), data=torch.empty(0), requires_grad=True,
            _z3_optimizer=object(),
        )  # fmt: skip
        (write,) = load_module.zero3_writes(collector, "w", param, files, "w")
        assert write.master.tolist() == [*range(numel), *[0.0] * (padded - numel)]
        assert (write.master.data_ptr() == write.value.data_ptr()) == (numel == padded)
        del param._z3_optimizer  # an engine without an optimizer: its partition only
        (write,) = load_module.zero3_writes(collector, "w", param, files, "w")
        assert write.master is None and write.value.tolist() == list(range(numel))


def test_zero3_partitions_that_cannot_be_written_in_place_are_named():
    """A pure predicate over the attributes DeepSpeed sets: a partition on NVMe (`final_location`, as
    `offload_param: {device: nvme}` sets it; NVMe offload itself cannot run on this machine), a placeholder of the
    wrong size, a gather in flight. The 2-rank refusal is in tests/load/test_load_guards.py."""
    from types import SimpleNamespace

    from shardsave.load import writes as load_module

    def param(status="NOT_AVAILABLE", location=None, numel=4):
        partition = torch.zeros(numel)
        partition.ds_numel, partition.final_location = 4, location
        return SimpleNamespace(ds_tensor=partition, ds_status=SimpleNamespace(name=status))

    assert load_module.zero3_unwritable(param()) is None
    assert load_module.zero3_unwritable(param("AVAILABLE")) is None  # gathered: written with its full copy
    assert "offloaded to NVMe" in load_module.zero3_unwritable(param(location=SimpleNamespace(value="nvme")))
    assert "placeholder" in load_module.zero3_unwritable(param(numel=1))
    assert "in flight" in load_module.zero3_unwritable(param("INFLIGHT"))
