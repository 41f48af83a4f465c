"""A base model described from its files alone (`shardsave.formats.hf_base`) against the same base described by
its transformers class (what `merge_into` builds otherwise): the same keys, shapes, tied weights, dtype and config
files byte for byte, on each model type of `shardsave.compat.HF_PLAIN_CAUSAL_LM`; and the table itself against the
installed transformers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from shardsave.compat import HF_LEGACY_RENAMES, HF_PLAIN_CAUSAL_LM, HF_TIED_HEAD, transformers_version
from shardsave.errors import MergedError
from shardsave.formats.hf_base import describe_plain_base
from shardsave.formats.hf_model import read_model_files
from shardsave.merged import offline

TYPES = sorted(HF_PLAIN_CAUSAL_LM)


def tiny_config(model_type: str, *, tie: bool, **kwargs):
    return AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=96,
                                tie_word_embeddings=tie, **kwargs)  # fmt: skip


def save_base(folder: Path, model_type: str, *, tie: bool, dtype=torch.float32, generation: bool = True, **kwargs):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tie=tie, **kwargs)).to(dtype)
    model.save_pretrained(str(folder))
    if not generation:
        (folder / "generation_config.json").unlink()
    return folder


def configs_written(base: offline._Base, folder: Path) -> dict[str, bytes]:
    folder.mkdir()
    base.write_configs(folder, None)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("model_type", TYPES)
def test_table_matches_the_installed_transformers(model_type):
    cls = HF_PLAIN_CAUSAL_LM[model_type]
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type] == cls
    assert get_checkpoint_conversion_mapping(model_type) is None and get_checkpoint_conversion_mapping(cls) is None
    for tie in (False, True):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(tiny_config(model_type, tie=tie))
        assert type(model).__name__ == cls
        assert dict(model.all_tied_weights_keys) == (dict([HF_TIED_HEAD]) if tie else {})
        # nothing but the legacy renamings, for every sub-model with a config
        legacy = get_checkpoint_conversion_mapping("legacy")
        assert len(get_model_conversion_mapping(model)) == len(legacy)
    patterns = [p for t in legacy for p in t.source_patterns]
    assert tuple(patterns) == HF_LEGACY_RENAMES


CASES = [(t, tie) for t in TYPES for tie in (False, True)]


@pytest.mark.parametrize(("model_type", "tie"), CASES, ids=[f"{t}-{'tied' if tie else 'untied'}" for t, tie in CASES])
def test_files_describe_what_the_class_describes(tmp_path, model_type, tie):
    """Keys, shapes, tied ones, dtype and the config files, for bases saved in fp32 / bf16 / fp16, merged in
    "auto" or another dtype."""
    for saved in (torch.float32, torch.bfloat16, torch.float16):
        folder = save_base(tmp_path / f"base-{saved}", model_type, tie=tie, dtype=saved)
        files = read_model_files(folder, allow_pickle=False, error=MergedError)
        for asked in (None, torch.bfloat16, torch.float32):
            plain = describe_plain_base(files, asked)
            assert plain is not None
            fast, slow = offline._describe(files, asked), offline._described_by_class(files, asked)
            assert fast.model is None and slow.model is not None
            assert sorted(fast.keys) == sorted(slow.keys) and fast.dtype == slow.dtype == (asked or saved)
            assert fast.shapes == slow.shapes and fast.tied == slow.tied
            name = f"{saved}-{asked}".replace("torch.", "")
            ours, theirs = configs_written(fast, tmp_path / f"fast-{name}"), configs_written(slow, tmp_path / name)
            assert ours == theirs


def test_what_the_files_do_not_prove_is_left_to_the_class(tmp_path):
    """Each of these bases is described by its class (None here): no generation_config.json, another version's
    config, a config not in transformers' form, another class, a legacy key, a layer missing, custom code."""
    folder = save_base(tmp_path / "base", "llama", tie=False)
    files = read_model_files(folder, allow_pickle=False, error=MergedError)
    assert describe_plain_base(files, None) is not None
    assert describe_plain_base(read_model_files(save_base(tmp_path / "nogen", "llama", tie=True, generation=False),
                                                allow_pickle=False, error=MergedError), None) is None  # fmt: skip
    config_path = folder / "config.json"
    text = config_path.read_text()
    data = json.loads(text)
    for changed in (
        {**data, "transformers_version": "5.0.0"},
        {**data, "architectures": ["LlamaForSequenceClassification"]},
        {**data, "model_type": "mixtral"},
        {**data, "auto_map": {"AutoModelForCausalLM": "x.Y"}},
        {**data, "num_hidden_layers": 3},
        {**data, "dtype": "float64"},
        {k: v for k, v in data.items() if k != "tie_word_embeddings"},
    ):
        config_path.write_text(json.dumps(changed, indent=2, sort_keys=True) + "\n")
        assert describe_plain_base(files, None) is None, changed
    config_path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")  # not as transformers writes it
    assert describe_plain_base(files, None) is None
    config_path.write_text(text)
    generation = folder / "generation_config.json"
    generation.write_text(generation.read_text().replace(transformers_version(), "4.57.0"))
    assert describe_plain_base(files, None) is None
    save_base(folder, "llama", tie=False)
    files.specs["model.layers.0.input_layernorm.weight_g"] = files.specs["model.norm.weight"]
    assert describe_plain_base(files, None) is None  # a legacy renaming would apply (and the layers differ)
    del files.specs["model.layers.0.input_layernorm.weight_g"]
    up = files.specs["model.layers.1.mlp.up_proj.weight"]
    files.specs["model.layers.1.mlp.up_proj.weight"] = type(up)((65, 32), up.dtype)
    assert describe_plain_base(files, None) is None  # a layer unlike the others
    del files.specs["model.layers.1.mlp.up_proj.weight"]
    assert describe_plain_base(files, None) is None
    assert not any(re.search(p, k) for k in files.specs for p in HF_LEGACY_RENAMES)


def test_split_of_an_output_that_fits_one_file_is_huggingface_hubs():
    """`split_files` answers an output within max_shard_size itself (huggingface_hub's size check imports
    torch.distributed.tensor): the same files, keys and (no) index as huggingface_hub's split, at the edges."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from shardsave.formats.hf_model import split_files
    from shardsave.storage.streaming import TensorSpec

    specs = {f"t{i}": TensorSpec((i + 1, 4), torch.float32 if i % 2 else torch.bfloat16) for i in range(6)}
    total = sum(s.nbytes for s in specs.values())
    for size in (total - 1, total, total + 1, "1GB", "1KB", 16):
        split = split_torch_state_dict_into_shards(
            {k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in specs.items()},
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=size,
        )
        shards, index = split_files(specs, size, 99)
        assert shards == dict(split.filename_to_tensors) and (index is None) == (not split.is_sharded), size
