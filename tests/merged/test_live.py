"""`shardsave.save_merged` from the live sharded model on 2 gloo ranks: the files equal PEFT's
`merge_and_unload().save_pretrained()` of the same weights byte for byte (config, generation config, every
safetensors shard, the index), load with `from_pretrained` to the merged model's logits, and the live model
is unchanged (its logits, and training goes on)."""

from __future__ import annotations

import json

import pytest
import torch
from multirank import check_ok, run_ranks

pytestmark = pytest.mark.multirank
CASES = [  # backend, adapter variant, parallel_write (None: each rank writes its runs into the shared folder)
    ["ddp", "lora", None],  # whole on every rank: the writer merges and writes
    ["fsdp2", "lora", None],
    ["fsdp1", "lora", False],  # the runs stream to the writer
    ["zero3", "lora", None],
    ["fsdp2", "dora", None],  # FSDP2's rows: merged where they are held
    ["zero3", "dora", None],  # runs that cut rows: DoRA's norm needs whole rows, merged whole on the writer
    ["fsdp1_flat", "dora_bf16", False],
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("merged")
    check_ok(run_ranks("merged_save", out, world_size=2, limit=900, cases=CASES, disk_full=["fsdp1", "lora"]))
    return out


@pytest.mark.parametrize("backend, variant, parallel", CASES)
def test_save_merged_writes_what_peft_writes(saved, backend, variant, parallel):
    from tiny import logits
    from transformers import AutoModelForCausalLM

    folder = saved / f"{backend}-{variant}"
    ours, theirs = folder / "ours", folder / "theirs"
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) >= 2
    for name in names:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    loaded = AutoModelForCausalLM.from_pretrained(str(ours)).eval()
    torch.testing.assert_close(logits(loaded), torch.load(folder / "logits.pt"), atol=0, rtol=0)
    assert all(json.loads((folder / f"unchanged-{rank}.json").read_text()) for rank in range(2))


@pytest.mark.parametrize("where", ["writer", "parallel"])
def test_a_full_disk_fails_every_rank_and_keeps_the_previous_save(saved, where):
    """The writer's disk fills while the others send, or rank 1's while every rank writes into the staged files."""
    folder = saved / "fsdp1-lora"
    outcomes = [(folder / f"disk-full-{where}-{rank}.txt").read_text() for rank in range(2)]
    failing = 0 if where == "writer" else 1
    assert "No space left on device" in outcomes[failing] and "Nothing was published" in outcomes[failing], outcomes
    other = outcomes[1 - failing]
    assert f"failed on rank {failing}" in other and "No space left" in other, outcomes
    names = sorted(p.name for p in (folder / "theirs").iterdir())
    assert sorted(p.name for p in (folder / "ours").iterdir()) == names  # the first save, whole
    for name in names:
        assert (folder / "ours" / name).read_bytes() == (folder / "theirs" / name).read_bytes(), name
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_what_cannot_be_merged_is_refused_before_anything_is_written(tmp_path):
    from peft import LoraConfig
    from tiny import peft_model

    import shardsave

    tied = peft_model(LoraConfig(target_modules=["q_proj", "lm_head"]), tie=True)
    with pytest.raises(ValueError, match="lm_head.weight, which the base model ties to"):
        shardsave.save_merged(tied, tmp_path / "out")
    model = peft_model(LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"\['nope'\] not among"):
        shardsave.save_merged(model, tmp_path / "out", selected_adapters=["nope"])
    with pytest.raises(ValueError, match="safetensors only"):
        shardsave.save_merged(model, tmp_path / "out", safe_serialization=False)
    assert not (tmp_path / "out").exists()


def test_a_pissa_adapter_merges_into_its_live_residual_base(tmp_path):
    """In training, the live base is the residual base PiSSA initialised: merged as PEFT merges it (offline, the
    saved base is not, and the merge refuses until the adapter is converted)."""
    from peft import LoraConfig
    from tiny import peft_model

    import shardsave

    model = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    shardsave.save_merged(model, tmp_path / "ours")
    model.merge_and_unload().save_pretrained(str(tmp_path / "theirs"))
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name


VARIANTS = {
    "patterns": {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "rank_pattern": {"v_proj": 4},
                 "alpha_pattern": {"q_proj": 32}},
    "embeddings": {"target_modules": ["q_proj", "embed_tokens", "lm_head"]},
    "tokens": {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [1, 5]}},
    "lora_bias": {"target_modules": ["q_proj", "v_proj"], "lora_bias": True},
    "dora_fan": {"target_modules": ["q_proj"], "use_dora": True, "modules_to_save": ["lm_head"]},
}  # fmt: skip


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_adapter_kind_merges_as_peft_merges(variant, dtype, tmp_path):
    """One process (the writer merges every tensor whole): each adapter kind, fp32 and bf16, with two adapters
    merged together where the kind allows, equal to PEFT's merge_and_unload().save_pretrained() byte for byte."""
    from peft import LoraConfig
    from tiny import peft_model

    import shardsave

    config = LoraConfig(**VARIANTS[variant])
    second = [("second", LoraConfig(target_modules=["q_proj", "k_proj"], r=4))] if variant == "patterns" else []
    selected = ["default", "second"] if second else None
    model = peft_model(config, dtype=dtype, adapters=second, bias=variant == "lora_bias")
    shardsave.save_merged(model, tmp_path / "ours", selected_adapters=selected, max_shard_size="60KB")
    merged = model.merge_and_unload(adapter_names=selected)
    merged.save_pretrained(str(tmp_path / "theirs"), max_shard_size="60KB")
    names = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == names
    for name in names:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name


def test_an_older_transformers_is_refused_by_name(monkeypatch, tmp_path):
    """Merged writes reproduce transformers 5's save_pretrained (tied keys, reverted conversions): an older
    transformers without those functions gets a clear error, not a guessed file."""
    import transformers.modeling_utils
    from peft import LoraConfig
    from tiny import peft_model

    import shardsave
    from shardsave.compat import UnsupportedVersionError

    monkeypatch.delattr(transformers.modeling_utils, "revert_weight_conversion")
    with pytest.raises(UnsupportedVersionError, match="Install transformers>=5"):
        shardsave.save_merged(peft_model(LoraConfig(target_modules=["q_proj"])), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _q_proj_merge(dora: bool):
    """The tiny model's q_proj base weight, its merge steps and adapter tensors (as save_merged has them)."""
    from peft import LoraConfig, get_peft_model_state_dict
    from tiny import peft_model

    from shardsave.plan.merge_steps import plan_merge

    model = peft_model(LoraConfig(target_modules=["q_proj"], use_dora=dora))
    state = get_peft_model_state_dict(model)
    steps = plan_merge([("default", model.peft_config["default"].to_dict(), list(state))])
    key = "model.layers.0.self_attn.q_proj.weight"
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach()
    return base, steps[key], {("default", k): v.detach() for k, v in state.items()}


@pytest.mark.parametrize("dora", [False, True])
def test_every_input_of_a_merge_is_moved_to_the_merge_device(monkeypatch, dora):
    """A base run on one device (a GPU shard) and factors on another (the host) are merged on one device: the
    result's bits then depend on that device alone. 'meta' stands in for the device the inputs are not on."""
    from shardsave.merged import exchange as merged_save

    base, steps, tensors = _q_proj_merge(dora)
    devices, real = [], merged_save.merge_tensor

    def spy(run, shape, steps, tensors, **kwargs):
        devices.append({run.device.type, *(t.device.type for t in tensors.values())})
        return real(run, shape, steps, tensors, **kwargs)

    monkeypatch.setattr(merged_save, "merge_tensor", spy)
    shape, cols = tuple(base.shape), base.shape[1]
    runs = [(0, base.reshape(-1))] + ([] if dora else [(cols + 3, base.reshape(-1)[cols + 3 : 5 * cols - 1])])
    for start, run in runs:  # whole; a run cutting rows (LoRA only: DoRA's are merged whole)
        out = merged_save.merge_on(torch.device("meta"), run, shape, torch.float32, steps, tensors, start=start)
        assert out.device.type == "meta" and out.shape == run.shape
    assert devices == [{"meta"}] * len(runs)
    assert merged_save.MERGE_DEVICE == torch.device("cpu")
    on_cpu = merged_save.merge_on(merged_save.MERGE_DEVICE, base, shape, torch.float32, steps, tensors)
    from shardsave.tensors.merge_math import merge_tensor

    assert torch.equal(on_cpu, merge_tensor(base.clone(), shape, steps, tensors))
    assert not torch.equal(on_cpu, base)  # the merge changed it, into a fresh buffer
    assert base.data_ptr() != on_cpu.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_on_a_gpu_save_merged_writes_the_cpu_merge(tmp_path, dtype):
    """Every tensor held whole on the GPU (the base, lora_bias, a modules_to_save copy) with the factors: merged on
    the CPU, so the files equal PEFT's merge_and_unload() of the same weights on the CPU, byte for byte."""
    import copy

    from peft import LoraConfig
    from tiny import peft_model

    import shardsave

    config = LoraConfig(target_modules=["q_proj", "v_proj"], lora_bias=True, modules_to_save=["lm_head"])
    model = peft_model(config, dtype=dtype, bias=True)
    reference = copy.deepcopy(model)
    model.to("cuda")
    shardsave.save_merged(model, tmp_path / "ours", max_shard_size="60KB")
    reference.merge_and_unload().save_pretrained(str(tmp_path / "theirs"), max_shard_size="60KB")
    names = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == names
    for name in names:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name
    assert all(p.device.type == "cuda" for p in model.parameters())  # the live model stayed where it was


def test_reading_back_finds_a_range_that_did_not_hold(tmp_path, monkeypatch):
    """The check behind a parallel write: every range a rank wrote, read back in chunks, against the CRC of what
    it meant to write; a range of zeros (another writer's copy won) or a file of the wrong size is named."""
    import os
    import zlib

    from shardsave import SaveError
    from shardsave.merged import parallel as merged_save

    monkeypatch.setattr(merged_save, "_READ_CHUNK", 7)  # ranges over several chunks
    data = os.urandom(100)
    (tmp_path / "model-1.safetensors").write_bytes(data)
    ranges = [merged_save._Written("model-1.safetensors", a, b - a, zlib.crc32(data[a:b])) for a, b in ((0, 8),
              (8, 60), (60, 100))]  # fmt: skip
    merged_save._read_back(tmp_path, ranges, {"model-1.safetensors": 100}, rank=1)
    with pytest.raises(SaveError, match=r"100 bytes long, not 120.*parallel_write=False"):
        merged_save._read_back(tmp_path, ranges, {"model-1.safetensors": 120}, rank=0)
    with open(tmp_path / "model-1.safetensors", "r+b") as f:
        f.seek(30)
        f.write(bytes(5))
    with pytest.raises(SaveError, match=r"model-1.safetensors \(rank 1, .*bytes \[8, 60\) this rank wrote"):
        merged_save._read_back(tmp_path, ranges, {}, rank=1)
