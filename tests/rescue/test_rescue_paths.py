"""The rescue's two paths give the same bytes: planned from metadata alone (`shardsave.rescue.fast`, neither peft
nor transformers imported) and on PEFT's meta-device skeleton (forced with `SKELETON_SWITCH`), on DCP checkpoints
of several adapter kinds; and the fast path is the one taken where it applies, the skeleton where it does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from peft import LoraConfig
from tiny import llama_config, peft_model

import shardsave.rescue.checkpoint as checkpoint_module
from shardsave.rescue.checkpoint import rescue_adapter
from shardsave.rescue.fast import SKELETON_SWITCH

QV = ["q_proj", "v_proj"]


def lora(**kwargs) -> LoraConfig:
    return LoraConfig(**{"task_type": "CAUSAL_LM", "r": 4, "target_modules": QV, **kwargs})


#: case -> (the first adapter's config, further (name, config) pairs, whether the fast path applies)
CASES = {
    "lora": (lora(), (), True),
    "dora": (lora(use_dora=True), (), True),
    "rslora": (lora(target_modules=["k_proj", "down_proj"], use_rslora=True), (), True),
    "patterns": (lora(rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}), (), True),
    "regex": (lora(target_modules=r".*\.(q|o)_proj", r=3), (), True),
    "no_task_type": (lora(task_type=None), (), True),
    "modules_to_save": (lora(modules_to_save=["lm_head"]), (), True),
    "two_adapters": (lora(), (("other", lora(target_modules=["k_proj"], r=2, lora_alpha=4, use_dora=True)),), True),
    "embedding_targeted": (lora(target_modules=["q_proj", "embed_tokens"]), (), False),
    "bias": (lora(bias="all"), (), False),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    llama_config().save_pretrained(str(folder))
    return folder


def _checkpoint(root: Path, case: str, card: bool) -> Path:
    config, adapters, _ = CASES[case]
    model = peft_model(config, adapters=list(adapters))
    folder = root / "checkpoint-5"
    dcp.save(model.state_dict(), checkpoint_id=str(folder / "model"))
    for name in model.peft_config:
        model.peft_config[name].save_pretrained(str(folder / ("" if name == "default" else name)))
    if card:
        (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# My adapter\n\n### Framework versions\n\n")
    return folder


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("case", list(CASES))
def test_both_paths_write_the_same_bytes(case, safe, base, tmp_path, monkeypatch):
    folder = _checkpoint(tmp_path, case, card=case == "lora")
    taken = []
    plan = checkpoint_module.plan_without_skeleton

    def spy(*args, **kwargs):
        result = plan(*args, **kwargs)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(checkpoint_module, "plan_without_skeleton", spy)
    fast = rescue_adapter(folder, tmp_path / "fast", base=base, safe_serialization=safe)
    monkeypatch.setenv(SKELETON_SWITCH, "1")
    skeleton = rescue_adapter(folder, tmp_path / "skeleton", base=base, safe_serialization=safe)
    assert taken == [CASES[case][2], False]
    files = sorted(p.relative_to(skeleton) for p in skeleton.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(fast) for p in fast.rglob("*") if p.is_file())
    for f in files:
        assert (fast / f).read_bytes() == (skeleton / f).read_bytes(), f


def test_a_resized_vocabulary_takes_the_skeleton_path(base, tmp_path, monkeypatch):
    model = peft_model(lora())
    model.base_model.model.resize_token_embeddings(model.base_model.model.config.vocab_size + 8)
    folder = tmp_path / "checkpoint-1"
    dcp.save(model.state_dict(), checkpoint_id=str(folder / "model"))
    model.peft_config["default"].save_pretrained(str(folder))
    plan = checkpoint_module.plan_without_skeleton
    taken = []
    monkeypatch.setattr(checkpoint_module, "plan_without_skeleton", lambda *a, **k: taken.append(plan(*a, **k)))
    rescue_adapter(folder, tmp_path / "out", base=base)
    assert taken == [None]  # (what it saves: test_rescue.py::test_resized_vocabulary_saves_the_embeddings)
