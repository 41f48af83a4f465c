"""`shardsave.verify` catches each broken adapter a distributed save produces, and passes the sound ones."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tiny import assert_same_files, base_model, llama_config, peft_model, train_a_little, with_adapters

import shardsave
from shardsave.checks.verify import KINDS, VerifyError, check_tensors, verify_adapter, warn_findings
from shardsave.cli.verify import main
from shardsave.plan.names import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]
REPO = Path(__file__).resolve().parents[2]


def _trained(config: LoraConfig, *, adapters=()):
    """A LoRA initialised by PEFT (B = 0) and trained a little, so that every B is non-zero."""
    model = with_adapters(base_model(), config, adapters)
    train_a_little(model)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _trained(LoraConfig(r=4, target_modules=TARGETS))


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """PEFT's own save of the trained adapter."""
    out = tmp_path_factory.mktemp("peft")
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    llama_config().save_pretrained(str(out))
    return out


def _copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "adapter"))


def _rewrite(directory: Path, edit) -> None:
    """Apply `edit(tensors)` to the adapter's tensors and write them back as safetensors."""
    path = directory / SAFETENSORS_NAME
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _kinds(report) -> set[tuple[str, str | None]]:
    return {(f.kind, f.key) for f in report.findings}


def _lora_b(tensors: dict) -> list[str]:
    return [k for k in tensors if ".lora_B." in k]


# --- sound adapters ---------------------------------------------------------------------------------------


def test_peft_save_is_sound(saved, base_dir):
    report = verify_adapter(saved)
    assert report.sound, report.findings
    assert [(a.name, a.file, a.tensors) for a in report.adapters] == [("default", SAFETENSORS_NAME, 16)]
    assert verify_adapter(saved, base=str(base_dir)).sound


def test_shardsave_save_with_dora_embedding_and_second_adapter_is_sound(tmp_path, base_dir):
    model = _trained(
        LoraConfig(
            r=4, target_modules=["q_proj", "down_proj", "embed_tokens"], use_dora=True, rank_pattern={"down_proj": 2}
        ),
        adapters=[("other", LoraConfig(r=2, target_modules="all-linear", modules_to_save=["lm_head"]))],
    )
    shardsave.save_pretrained(model, tmp_path / "out")
    report = verify_adapter(tmp_path / "out", base=str(base_dir))
    assert report.sound, report.findings
    assert [a.name for a in report.adapters] == ["default", "other"]


def test_bin_adapter_read_only_with_allow_pickle(model, tmp_path):
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    with pytest.raises(VerifyError, match="pickle.*--allow-pickle"):
        verify_adapter(tmp_path)
    assert verify_adapter(tmp_path, allow_pickle=True).sound


# --- broken adapters: problems, exit 1 -------------------------------------------------------------------


def test_untrained_adapter_does_nothing(tmp_path):
    get_peft_model(base_model(), LoraConfig(r=4, target_modules=TARGETS)).save_pretrained(str(tmp_path))
    report = verify_adapter(tmp_path)
    assert _kinds(report) == {("no_effect", None)}
    assert "untrained" in report.findings[0].message and "base model" in report.findings[0].message


def test_zeroed_lora_b(saved, tmp_path):
    adapter = _copy(saved, tmp_path)
    _rewrite(adapter, lambda t: [t[k].zero_() for k in _lora_b(t)])
    assert _kinds(verify_adapter(adapter)) == {("no_effect", None)}


def test_one_zeroed_lora_b_is_named(saved, tmp_path):
    adapter = _copy(saved, tmp_path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _rewrite(adapter, lambda t: t[key].zero_())
    assert _kinds(verify_adapter(adapter)) == {("zero_lora_b", key)}


def _keep_first_quarter(tensors: dict) -> None:
    """What FSDP2's rank 0 holds of every lora_B (dim-0 chunks of 4 ranks), the rest zero."""
    for k in _lora_b(tensors):
        tensors[k][math.ceil(tensors[k].shape[0] / 4) :] = 0


def test_one_rank_slice_of_rows_names_the_world_size(saved, tmp_path):
    adapter = _copy(saved, tmp_path)
    _rewrite(adapter, _keep_first_quarter)
    report = verify_adapter(adapter)
    assert [(f.kind, f.key) for f in report.findings] == [("sliced", None)]
    assert "part 0 of 4" in report.findings[0].message and "likely 4 ranks" in report.findings[0].message


def test_one_rank_slice_of_columns_at_a_later_rank(tmp_path):
    _trained(LoraConfig(r=8, target_modules=TARGETS)).save_pretrained(str(tmp_path))

    def keep_rank_2_of_4(tensors):
        for k in _lora_b(tensors):
            tensors[k][:, :4] = 0
            tensors[k][:, 6:] = 0

    _rewrite(tmp_path, keep_rank_2_of_4)
    (finding,) = verify_adapter(tmp_path).findings
    assert finding.kind == "sliced" and "columns of part 2 of 4" in finding.message


def test_empty_tensors_like_an_ungathered_zero3_save(saved, tmp_path):
    adapter = _copy(saved, tmp_path)
    _rewrite(adapter, lambda t: t.update({k: torch.empty(0) for k in t}))
    report = verify_adapter(adapter)
    assert {f.kind for f in report.findings} == {"empty"}
    assert {f.key for f in report.findings} == set(load_file(str(saved / SAFETENSORS_NAME)))


def test_nan(saved, tmp_path):
    adapter = _copy(saved, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite(adapter, lambda t: t[key].view(-1).__setitem__(3, float("nan")))
    assert _kinds(verify_adapter(adapter)) == {("non_finite", key)}


def test_wrong_r_in_config(saved, tmp_path):
    adapter = _copy(saved, tmp_path)
    config = json.loads((adapter / CONFIG_NAME).read_text())
    (adapter / CONFIG_NAME).write_text(json.dumps({**config, "r": 8}))
    report = verify_adapter(adapter)
    assert {f.kind for f in report.findings} == {"shape"}
    assert {f.key for f in report.findings} == set(load_file(str(saved / SAFETENSORS_NAME)))
    assert "r=8" in report.findings[0].message


def test_keys_without_prefix(saved, tmp_path):
    adapter = _copy(saved, tmp_path)
    prefix = "base_model.model."

    def strip(tensors):
        for k in list(tensors):
            tensors[k.removeprefix(prefix)] = tensors.pop(k)

    _rewrite(adapter, strip)
    report = verify_adapter(adapter)
    assert {f.kind for f in report.findings} == {"no_prefix"}
    assert len(report.findings) == 16


def test_base_missing_module_and_unexpected_keys(saved, tmp_path, base_dir):
    adapter = _copy(saved, tmp_path)
    module, other = "base_model.model.model.layers.1.mlp.down_proj", "base_model.model.model.layers.0.mlp.up_proj"
    _rewrite(adapter, lambda t: [t.pop(f"{module}.lora_{p}.weight") for p in "AB"])
    assert verify_adapter(adapter).sound  # the file alone looks fine
    assert _kinds(verify_adapter(adapter, base=str(base_dir))) == {
        ("missing", f"{module}.lora_A.weight"),
        ("missing", f"{module}.lora_B.weight"),
    }
    _rewrite(
        adapter,
        lambda t: t.update({f"{other}.lora_A.weight": torch.ones(4, 32), f"{other}.lora_B.weight": torch.ones(64, 4)}),
    )
    assert verify_adapter(adapter).sound
    assert {(k, f) for k, f in _kinds(verify_adapter(adapter, base=str(base_dir))) if k == "unexpected"} == {
        ("unexpected", f"{other}.lora_A.weight"),
        ("unexpected", f"{other}.lora_B.weight"),
    }


def test_base_that_cannot_be_found(saved, tmp_path):
    with pytest.raises(VerifyError, match="--base nobody/no-such-model: neither a folder"):
        verify_adapter(saved, base="nobody/no-such-model")
    assert main([str(saved), "--base", str(tmp_path)]) == 2


# --- the same checks on tensors in memory, and on every save and merge --------------------------------------

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

#: an edit of the trained adapter's tensors, a change of its config, and what check_tensors must find
IN_MEMORY = {
    "empty": (lambda t: t.update({Q_A: torch.empty(0)}), {}, {("empty", Q_A)}),
    "non_finite": (lambda t: t[Q_A].view(-1).__setitem__(3, float("inf")), {}, {("non_finite", Q_A)}),
    "no_prefix": (lambda t: t.update({Q_A.removeprefix("base_model.model."): t.pop(Q_A)}), {},
                  {("no_prefix", Q_A.removeprefix("base_model.model."))}),
    "shape": (lambda t: None, {"r": 8}, None),  # every tensor: checked below
    "incomplete": (lambda t: t.pop(V_B), {}, {("incomplete", V_B)}),
    "no_effect": (lambda t: [t[k].zero_() for k in _lora_b(t)], {}, {("no_effect", None)}),
    "zero_lora_b": (lambda t: t[V_B].zero_(), {}, {("zero_lora_b", V_B)}),
    "sliced": (_keep_first_quarter, {}, {("sliced", None)}),
    "no_tensors": (lambda t: t.clear(), {}, {("no_tensors", None)}),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(IN_MEMORY))
def test_check_tensors_in_memory_finds_each_kind(model, kind):
    edit, change, expected = IN_MEMORY[kind]
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    edit(tensors)
    config = {**model.peft_config["default"].to_dict(), **change}  # peft_type a PeftType, target_modules a set
    # a mapping, and pairs consumed one at a time, find the same
    findings = check_tensors("default", config, tensors)
    assert findings == check_tensors("default", config, ((k, v) for k, v in tensors.items()))
    assert {f.kind for f in findings} <= set(KINDS)
    if expected is None:
        assert {(f.kind, f.key) for f in findings} == {("shape", k) for k in tensors}
    else:
        assert {(f.kind, f.key) for f in findings} == expected


def test_check_tensors_of_the_trained_adapter_finds_nothing(model):
    assert check_tensors("default", model.peft_config["default"].to_dict(), get_peft_model_state_dict(model)) == []


def test_check_tensors_sums_that_overflow_and_negative_zero():
    """The quick paths (a finite sum proves finite values; a lora_B non-zero or zero everywhere) stay exact."""
    big = torch.full((4, 8), 3e38)  # finite, but its sum overflows to inf
    key = "base_model.model.m.lora_"
    config = {"peft_type": "LORA", "r": 4}
    assert check_tensors("a", config, {key + "A.weight": big, key + "B.weight": big.T.contiguous()}) == []
    minus_zero = torch.full((8, 4), -0.0)
    (finding,) = check_tensors("a", config, {key + "A.weight": big, key + "B.weight": minus_zero})
    assert finding.kind == "no_effect"
    big[1, 2] = float("nan")
    assert [(f.kind, f.key) for f in check_tensors("a", config, {key + "A.weight": big})] == [
        ("non_finite", key + "A.weight"),
        ("incomplete", key + "B.weight"),
    ]


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shardsave" and r.levelno >= logging.WARNING]


def test_warning_lists_the_findings_and_the_command(caplog, tmp_path):
    findings = check_tensors("default", {"peft_type": "LORA", "r": 4}, {f"x{i}.lora_A.weight": torch.ones(4, 2)
                                                                        for i in range(25)})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="shardsave"):
        warn_findings(findings, tmp_path / "my adapter")
        warn_findings([], tmp_path)
    (record,) = _warnings(caplog)
    text = record.getMessage()
    assert text.startswith(f"50 problem(s) in the adapter written to {tmp_path / 'my adapter'}")
    assert f"python -m shardsave.verify '{tmp_path / 'my adapter'}'" in text
    assert "  [no_prefix] x0.lora_A.weight: does not start" in text and "... and 30 more" in text
    assert len(text.splitlines()) == 1 + 20 + 1


def test_save_of_an_untrained_adapter_warns_and_still_writes_peft_bytes(caplog, tmp_path):
    fresh = get_peft_model(base_model(), LoraConfig(r=4, target_modules=TARGETS))  # PEFT initialises lora_B to 0
    with caplog.at_level(logging.WARNING, logger="shardsave"):
        shardsave.save_pretrained(fresh, tmp_path / "ours")
    (record,) = _warnings(caplog)
    assert "[no_effect] adapter 'default': all 8 lora_B tensors are zero" in record.getMessage()
    assert str(tmp_path / "ours") in record.getMessage()
    fresh.save_pretrained(str(tmp_path / "theirs"))
    assert_same_files(tmp_path / "ours", tmp_path / "theirs", fresh)


def test_save_of_a_sound_adapter_does_not_warn(model, caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="shardsave"):
        shardsave.save_pretrained(model, tmp_path / "out")
    assert not _warnings(caplog)


def test_merge_of_a_sliced_and_an_untrained_adapter_warns_and_publishes(caplog, tmp_path):
    model = peft_model(LoraConfig(r=4, target_modules=TARGETS))  # random, non-zero lora_B
    with torch.no_grad():
        _keep_first_quarter(dict(model.named_parameters()))
    model.add_adapter("untrained", LoraConfig(r=2, target_modules=["k_proj"]))  # its lora_B are zero
    shardsave.save_shards(model, tmp_path / "shards")
    with caplog.at_level(logging.WARNING, logger="shardsave"):
        out = shardsave.merge_shards(tmp_path / "shards", tmp_path / "merged")
    (record,) = _warnings(caplog)
    assert "[sliced] adapter 'default'" in record.getMessage()
    assert "[no_effect] adapter 'untrained'" in record.getMessage()
    assert (out / SAFETENSORS_NAME).is_file() and (out / "untrained" / SAFETENSORS_NAME).is_file()


def test_checks_run_on_one_thread_and_restore_the_callers_thread_count(saved, model, tmp_path):
    """The checks set one intra-op thread while they run and give the caller its own count back afterwards,
    also when reading fails partway; the CLI too."""
    from peft import get_peft_model_state_dict

    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not the default: restored means the caller's value, not the machine's
    try:
        seen = []
        tensors = get_peft_model_state_dict(model)

        def pairs(fail: bool):
            for i, item in enumerate(tensors.items()):
                seen.append(torch.get_num_threads())
                if fail and i == 2:
                    raise VerifyError("corrupt partway")
                yield item

        assert check_tensors("default", model.peft_config["default"].to_dict(), pairs(False)) == []
        assert set(seen) == {1} and torch.get_num_threads() == 3
        with pytest.raises(VerifyError, match="corrupt partway"):
            check_tensors("default", model.peft_config["default"].to_dict(), pairs(True))
        assert torch.get_num_threads() == 3
        assert verify_adapter(saved).sound and torch.get_num_threads() == 3
        adapter = _copy(saved, tmp_path)
        os.truncate(adapter / SAFETENSORS_NAME, (adapter / SAFETENSORS_NAME).stat().st_size - 10)
        assert main([str(adapter)]) == 2 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# --- unreadable: exit 2 ----------------------------------------------------------------------------------


def test_truncated_file(saved, tmp_path):
    adapter = _copy(saved, tmp_path)
    path = adapter / SAFETENSORS_NAME
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(VerifyError, match="truncated or corrupt"):
        verify_adapter(adapter)
    path.write_bytes(b"\xff" * 8 + b"{}")  # a header length far past the end
    with pytest.raises(VerifyError, match=str(path)):
        verify_adapter(adapter)


def test_missing_or_unreadable_config(saved, tmp_path):
    adapter = _copy(saved, tmp_path)
    (adapter / CONFIG_NAME).write_text("{not json")
    with pytest.raises(VerifyError, match="adapter_config.json: unreadable"):
        verify_adapter(adapter)
    (adapter / CONFIG_NAME).unlink()
    with pytest.raises(VerifyError, match="no adapter_config.json.*adapter_model.safetensors is here"):
        verify_adapter(adapter)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_would_run_code_is_never_executed(saved, tmp_path):
    adapter = _copy(saved, tmp_path)
    (adapter / SAFETENSORS_NAME).unlink()
    marker = tmp_path / "ran"
    torch.save({"base_model.model.x.lora_A.weight": _RunsCode(marker)}, adapter / BIN_NAME, pickle_module=pickle)
    assert main([str(adapter)]) == 2
    assert main([str(adapter), "--allow-pickle"]) == 2  # weights_only refuses the call
    assert not marker.exists()


# --- the command line ------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "shardsave.verify", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_exit_codes_and_json(saved, tmp_path):
    sound = _cli(str(saved), "--json")
    assert sound.returncode == 0, sound.stderr
    data = json.loads(sound.stdout)
    assert data["sound"] is True and data["findings"] == [] and data["adapters"][0]["name"] == "default"

    adapter = _copy(saved, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    _rewrite(adapter, lambda t: t.update({key: torch.empty(0)}))
    broken = _cli(str(adapter), "--json")
    assert broken.returncode == 1
    findings = json.loads(broken.stdout)["findings"]
    assert findings == [{"adapter": "default", "kind": "empty", "key": key, "message": findings[0]["message"]}]
    assert all(f["kind"] in KINDS for f in findings)

    os.truncate(adapter / SAFETENSORS_NAME, 100)
    unreadable = _cli(str(adapter), "--json")
    assert unreadable.returncode == 2
    assert "truncated or corrupt" in json.loads(unreadable.stdout)["error"]
    assert "shardsave.verify: error:" in unreadable.stderr


def test_text_output_names_each_key(saved, tmp_path, capsys):
    adapter = _copy(saved, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite(adapter, lambda t: t[key].fill_(float("inf")))
    assert main([str(adapter)]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and f"[non_finite] {key}:" in out
