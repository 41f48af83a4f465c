"""`save_embedding_layers="auto"` with a Hub id base model: the vocab check reads the base `config.json` from
the local Hugging Face cache (never the network), so a resized vocabulary is saved as PEFT saves it with the
Hub reachable."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
from peft import LoraConfig
from safetensors import safe_open
from tiny import VOCAB, assert_same_files, llama_config, peft_model

import shardsave
from shardsave.plan.structure import base_config_file

REPO = "org/name"
SHA = "0123456789abcdef0123456789abcdef01234567"
EMBED = "base_model.model.model.embed_tokens.weight"


def fake_cache(root: Path, *, vocab: int | None, ref: str = "main") -> Path:
    """huggingface_hub's cache layout for `org/name` at `ref`: `config.json` with `vocab`, or (None) the
    marker of a file the Hub does not have."""
    repo = root / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / ref).write_text(SHA)
    if vocab is None:
        (repo / ".no_exist" / SHA).mkdir(parents=True)
        (repo / ".no_exist" / SHA / "config.json").touch()
    else:
        llama_config(vocab=vocab).save_pretrained(repo / "snapshots" / SHA)
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def hub_model():
    model = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"]))
    model.peft_config["default"].base_model_name_or_path = REPO
    return model


def saved_keys(directory: Path) -> list[str]:
    with safe_open(directory / "adapter_model.safetensors", "pt") as f:
        return list(f.keys())


def save_recording(model, directory: Path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shardsave.save_pretrained(model, directory)
    return [str(w.message) for w in caught]


def test_base_config_file_looks_in_the_cache_only(cache, tmp_path):
    assert base_config_file(REPO) is None
    fake_cache(cache, vocab=64)
    assert base_config_file(REPO) == str(cache / "models--org--name" / "snapshots" / SHA / "config.json")
    assert base_config_file(str(tmp_path / "missing" / "dir")) is None  # not a Hub id either
    local = tmp_path / "local"
    llama_config().save_pretrained(local)
    assert base_config_file(str(local)) == str(local / "config.json")


def test_cached_revision_is_used_when_main_is_not_cached(cache):
    fake_cache(cache, vocab=64, ref="v1")
    assert base_config_file(REPO) is None
    assert base_config_file(REPO, revision="v1").endswith("config.json")


def test_resized_vocabulary_in_cache_saves_embeddings_like_peft_online(cache, tmp_path, monkeypatch):
    """PEFT with the Hub reachable (its Hub check answered from the same cache) saves the embeddings; so do we."""
    import peft.utils.save_and_load as peft_save

    fake_cache(cache, vocab=64)
    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", lambda repo, name: base_config_file(repo) is not None)
    model = hub_model()
    messages = save_recording(model, tmp_path / "ours")
    assert EMBED in saved_keys(tmp_path / "ours")
    assert any("resized during finetuning" in m for m in messages), messages
    model.save_pretrained(str(tmp_path / "theirs"))
    assert_same_files(tmp_path / "ours", tmp_path / "theirs", model)


def test_unchanged_vocabulary_in_cache_saves_no_embeddings(cache, tmp_path):
    fake_cache(cache, vocab=VOCAB)
    messages = save_recording(hub_model(), tmp_path / "ours")
    assert EMBED not in saved_keys(tmp_path / "ours")
    assert not any("config file" in m or "resized" in m for m in messages), messages


def test_config_known_missing_on_the_hub_saves_no_embeddings_quietly(cache, tmp_path):
    fake_cache(cache, vocab=None)
    assert base_config_file(REPO) is False
    messages = save_recording(hub_model(), tmp_path / "ours")
    assert EMBED not in saved_keys(tmp_path / "ours")
    assert not any("config file" in m for m in messages), messages


def test_not_in_cache_warns_as_peft_offline(cache, tmp_path):
    """The same warning and the same file as PEFT offline (HF_HUB_OFFLINE=1, set by conftest)."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = hub_model()
    messages = save_recording(model, tmp_path / "ours")
    expected = f"Could not find a config file in {REPO} - will assume that the vocabulary was not modified."
    assert expected in messages
    assert EMBED not in saved_keys(tmp_path / "ours")
    with pytest.warns(UserWarning, match="Could not find a config file"):
        model.save_pretrained(str(tmp_path / "theirs"))
    assert_same_files(tmp_path / "ours", tmp_path / "theirs", model)


SCRIPT = """
import sys
from peft import LoraConfig
from safetensors import safe_open
from tiny import peft_model
import shardsave
model = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"]))
model.peft_config["default"].base_model_name_or_path = "org/name"
shardsave.save_pretrained(model, sys.argv[1])
with safe_open(sys.argv[1] + "/adapter_model.safetensors", "pt") as f:
    print("embeddings saved" if "base_model.model.model.embed_tokens.weight" in f.keys() else "not saved")
"""


def test_hf_hub_cache_environment_variable_is_followed(tmp_path):
    """A fresh process with HF_HUB_CACHE (and offline mode) set, as a job would start."""
    fake_cache(tmp_path / "hub", vocab=64)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "helpers"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "ours")], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "embeddings saved"
