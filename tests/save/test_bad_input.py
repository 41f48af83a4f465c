"""Bad arguments fail before anything is written, with a message that names the input and the fix."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel
from tiny import base_model, peft_model

import shardsave
from shardsave.plan.names import check_adapter_name

QV = ["q_proj", "v_proj"]


def test_not_a_peft_model(tmp_path):
    with pytest.raises(TypeError, match="Expected a peft.PeftModel.*gather_state_dict"):
        shardsave.save_pretrained(base_model(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_selected_adapter_lists_available(tmp_path):
    with pytest.raises(ValueError, match=r"\['nope'\] not found.*\['default'\]"):
        shardsave.save_pretrained(peft_model(LoraConfig(target_modules=QV)), tmp_path / "o", selected_adapters=["nope"])
    with pytest.raises(ValueError, match="list of adapter names"):
        shardsave.save_pretrained(
            peft_model(LoraConfig(target_modules=QV)), tmp_path / "o", selected_adapters="default"
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["a/b", "/abs", "..", ".", "", "a\\b"])
def test_adapter_names_that_escape_are_rejected(name):
    with pytest.raises(ValueError, match="cannot be saved"):
        check_adapter_name(name)


def test_adapter_with_separator_in_model_is_rejected(tmp_path):
    model = peft_model(LoraConfig(target_modules=QV), adapters=[("x/evil", LoraConfig(target_modules=QV))])
    with pytest.raises(ValueError, match="'x/evil' cannot be saved"):
        shardsave.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_conversion_without_initial_adapter_files(tmp_path):
    (tmp_path / "init").mkdir()
    with pytest.raises(ValueError, match="no adapter_model.safetensors or adapter_model.bin"):
        shardsave.save_pretrained(
            peft_model(LoraConfig(target_modules=QV)),
            tmp_path / "o",
            path_initial_model_for_weight_conversion=str(tmp_path / "init"),
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("timeout", [0, -1, "10", True])
def test_bad_timeout(timeout, tmp_path):
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        shardsave.save_pretrained(peft_model(LoraConfig(target_modules=QV)), tmp_path / "o", timeout=timeout)


def test_bad_save_embedding_layers(tmp_path):
    with pytest.raises(ValueError, match="save_embedding_layers must be"):
        shardsave.save_pretrained(
            peft_model(LoraConfig(target_modules=QV)), tmp_path / "o", save_embedding_layers="yes"
        )


def test_non_lora_adapter_is_refused(tmp_path):
    from peft import IA3Config, get_peft_model

    model = get_peft_model(
        base_model(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    with pytest.raises(ValueError, match="LoRA-family"):
        shardsave.save_pretrained(model, tmp_path / "o")


def test_not_main_process_writes_nothing(tmp_path):
    shardsave.save_pretrained(peft_model(LoraConfig(target_modules=QV)), tmp_path / "o", is_main_process=False)
    assert not (tmp_path / "o").exists()
    assert isinstance(PeftModel, type) and torch.is_tensor(torch.zeros(1))
