"""benchmarks/rescue.py checks every method's output against the live adapter under PEFT's key names, and the
baselines filter full state dicts into those names: its filter must give exactly what PEFT saves (keys and
values), and the adapter it builds must not be zero, or the benchmark's "output correct" column shows nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from peft import get_peft_model_state_dict

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "rescue.py"
_spec = importlib.util.spec_from_file_location("rescue_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_filter_gives_peft_keys_and_a_nonzero_adapter(tmp_path):
    model = bench.lora_model(dict(hidden=64, layers=2, vocab=128, rank=4), tmp_path / "config")
    assert (tmp_path / "config" / "config.json").is_file()
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "config")
    expected = get_peft_model_state_dict(model)
    got = bench.peft_names(model.state_dict())
    assert list(got) == list(expected) and len(got) == 2 * 2 * 2  # 2 layers x q, v x A, B
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert all(got[k].abs().sum() > 0 for k in got if "lora_B" in k)
