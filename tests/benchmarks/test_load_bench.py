"""benchmarks/load.py gives the native loads the adapter file under the model's parameter names (PEFT's key rule,
inverted) and checks each load by gathering those names: the mapping must be exactly PEFT's, one file key per
LoRA parameter, or the native rows would load nothing (strict=False) and the checks compare the wrong tensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from peft import get_peft_model_state_dict

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"
_spec = importlib.util.spec_from_file_location("load_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_model_names_map_to_peft_file_keys():
    model = bench.lora_model(dict(hidden=64, layers=2, vocab=128, rank=4))
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    keys = [bench.file_key(n) for n in names]
    assert sorted(keys) == sorted(get_peft_model_state_dict(model)) and len(keys) == 2 * 2 * 2  # layers, q/v, A/B
    wrapped = "_fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module.self_attn.q_proj.lora_A"
    assert bench.clean_name(f"module.{wrapped}.default.weight") == names[0]
