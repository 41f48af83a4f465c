"""Reading adapter master weights out of real DeepSpeed ZeRO checkpoints (shardsave.formats.deepspeed)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from multirank import check_ok, run_ranks
from rescue_checks import rescue, same_files

from shardsave.formats.deepspeed import (
    DeepSpeedCheckpointError,
    UnsafeCheckpointError,
    checkpoint_dir,
    deepspeed_tensors,
    read_checkpoint,
    read_tensors,
)

LORA = {"target_modules": ["q_proj", "v_proj"], "r": 5}
EMBED = {"target_modules": ["q_proj", "embed_tokens"], "r": 4, "modules_to_save": ["lm_head"]}
#: 3 layers: the flat ZeRO-1/2 vector (3 x 560 elements) splits between the 2 ranks inside a lora_B, not at a
#: layer boundary. "big": a base of ~50 MB in the model states (vocabulary 200k) around an adapter of 4.4 KB.
RUNS = [
    {"name": "zero2", "stage": 2, "model": {"layers": 3}},
    {"name": "zero3_excluded", "stage": 3, "exclude_frozen": True, "model": {"layers": 3}},
    {"name": "zero2_bf16_excluded", "stage": 2, "bf16": True, "exclude_frozen": True, "model": {"layers": 3}},
    {"name": "zero3_bf16", "stage": 3, "bf16": True, "model": {"layers": 3}},
    {"name": "big", "stage": 2, "model": {"vocab": 200_000}},
    {"name": "zero1", "stage": 1, "model": {"layers": 3}},
    # a targeted embedding (its frozen base weight is saved with the adapter) and a modules_to_save copy
    {"name": "zero3_embed", "stage": 3, "lora": EMBED},
    {"name": "zero2_embed_excluded", "stage": 2, "exclude_frozen": True, "lora": EMBED},
]
KINDS = {run["name"]: run for run in RUNS}


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """Every run of RUNS trained on 2 gloo ranks and saved with engine.save_checkpoint (one launch)."""
    out = tmp_path_factory.mktemp("deepspeed")
    check_ok(run_ranks("deepspeed_save", out, runs=RUNS, lora=LORA))
    return out


def expected(saves: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(saves / name / "lora.pt")


@pytest.mark.parametrize("kind", ["zero2", "zero3_excluded", "zero2_bf16_excluded", "zero3_bf16"])
def test_master_weights_match_the_live_parameters(saves, kind):
    run = KINDS[kind]
    live = expected(saves, kind)
    checkpoint = read_checkpoint(saves / kind)
    assert checkpoint.stage == run["stage"] and checkpoint.world_size == 2
    assert checkpoint.folder == saves / kind / "global_step2"
    assert set(checkpoint.tensors) == set(live)  # canonical names; the optimizer holds only the adapter
    trained = torch.bfloat16 if run.get("bf16") else torch.float32
    # the model states keep every frozen name unless they were excluded
    assert (len(checkpoint.module_keys) > len(live)) is (not run.get("exclude_frozen"))

    got = read_tensors(checkpoint, list(live))
    assert list(got) == list(live)
    for name, value in live.items():
        entry = checkpoint.tensors[name]
        assert entry.shape == tuple(value.shape) and entry.dtype == trained == value.dtype, name
        assert got[name].dtype == torch.float32
        # fp32 training: the master weights are the live parameters; bf16: the live ones are their cast
        assert torch.equal(got[name].to(value.dtype), value), name
        assert got[name].abs().sum() > 0, name
    if run.get("bf16"):  # the master weights carry more than the bf16 parameters (or this test shows nothing)
        assert any(not torch.equal(got[n], live[n].float()) for n in live)


def test_tag_folder_and_other_tag(saves, tmp_path):
    live = expected(saves, "zero2")
    name = next(iter(live))
    tag_dir = saves / "zero2" / "global_step2"
    assert torch.equal(read_tensors(tag_dir, [name])[name], live[name])  # the tag's folder itself
    assert checkpoint_dir(tag_dir) == tag_dir
    copy = tmp_path / "ckpt"
    shutil.copytree(saves / "zero2", copy)
    shutil.copytree(copy / "global_step2", copy / "best")
    (copy / "global_step2" / "mp_rank_00_model_states.pt").unlink()  # `latest` names a broken tag now
    assert torch.equal(read_tensors(copy, [name], tag="best")[name], live[name])
    with pytest.raises(DeepSpeedCheckpointError, match="global_step2.*holds no .*best"):
        read_tensors(copy, [name])


def test_metadata_only_lists_shapes_and_dtypes(saves):
    entries = deepspeed_tensors(saves / "zero3_bf16")
    live = expected(saves, "zero3_bf16")
    assert {n: (e.shape, e.dtype) for n, e in entries.items()} == {
        n: (tuple(v.shape), v.dtype) for n, v in live.items()
    }


def test_missing_tag_lists_the_tags(saves, tmp_path):
    with pytest.raises(DeepSpeedCheckpointError, match=r"global_step9.*does not exist.*\['global_step2'\]"):
        read_checkpoint(saves / "zero2", tag="global_step9")
    copy = tmp_path / "ckpt"
    shutil.copytree(saves / "zero2", copy)
    (copy / "latest").unlink()
    with pytest.raises(DeepSpeedCheckpointError, match=r"no 'latest' file.*\['global_step2'\]"):
        read_checkpoint(copy)
    with pytest.raises(DeepSpeedCheckpointError, match="does not exist or is not a folder"):
        read_checkpoint(tmp_path / "nothing")


def test_missing_rank_file_is_named(saves, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(saves / "zero3_excluded", copy)
    (copy / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(DeepSpeedCheckpointError, match="saved by 2 ranks.*zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        read_checkpoint(copy)


def test_unknown_and_frozen_names(saves):
    with pytest.raises(DeepSpeedCheckpointError, match="frozen parameters.*read_frozen"):
        read_tensors(saves / "zero2", ["base_model.model.model.embed_tokens.weight"])
    with pytest.raises(DeepSpeedCheckpointError, match="no parameter named.*'nope'"):
        read_tensors(saves / "zero2", ["nope"])


class Payload:
    """Unpickling this runs os.makedirs: the reader must refuse it before it is called."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_foreign_global_is_refused_not_run(saves, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(saves / "zero2_bf16_excluded", copy)
    path = copy / "global_step2" / "mp_rank_00_model_states.pt"
    states = torch.load(path, weights_only=False)
    marker = tmp_path / "ran"
    torch.save({**states, "extra": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states.pt: refers to os.makedirs.*allow_pickle"):
        read_checkpoint(copy)
    code, err = rescue(copy, "-o", tmp_path / "out", "--base", copy / "base")  # the merge CLI: exit 2, not run
    assert code == 2 and "refers to os.makedirs" in err and not (tmp_path / "out").exists()
    assert not marker.exists()


def test_allow_pickle_reads_the_same(saves):
    live = expected(saves, "zero2")
    got = read_tensors(saves / "zero2", list(live), allow_pickle=True)
    assert all(torch.equal(got[n], live[n]) for n in live)


# --- layout on synthetic checkpoints: a pure check of the arithmetic for any world size -------------------------


def synthetic(
    folder: Path, stage: int, world: int, shapes: list[dict[str, tuple[int, ...]]], precision: str = "bf16"
) -> dict:
    """A tag folder laid out as ZeRO-`stage` lays out the fp32 partitions of random tensors (plain types only)."""
    gen = torch.Generator().manual_seed(stage * 10 + world)
    values = {k: torch.randn(s, generator=gen) for g in shapes for k, s in g.items()}
    tag = folder / "global_step1"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("global_step1")
    param_shapes = [{f"module.{k}": torch.Size(s) for k, s in g.items()} for g in shapes]
    ranks: list[list[torch.Tensor]] = [[] for _ in range(world)]
    if stage <= 2:
        for g in shapes:
            flat = torch.cat([values[k].reshape(-1) for k in g])
            size = math.ceil(flat.numel() / (2 * world)) * 2  # padded as DeepSpeed does, to a multiple of 2 * world
            flat = torch.cat([flat, torch.zeros(size * world - flat.numel())])
            for r in range(world):
                ranks[r].append(flat[r * size : (r + 1) * size].clone())
        key, states_name = "single_partition_of_fp32_groups", "mp_rank_00_model_states.pt"
    else:
        for g in shapes:
            for r in range(world):
                pieces = []
                for k in g:
                    n = values[k].numel()
                    piece = math.ceil(n / world)
                    part = values[k].reshape(-1)[r * piece : (r + 1) * piece]
                    pieces.append(torch.cat([part, torch.zeros(piece - part.numel())]))
                ranks[r].append(torch.cat(pieces))
        key, states_name = "fp32_flat_groups", "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save(
        {"module": {}, "param_shapes": param_shapes, "ds_config": {precision: {"enabled": True}}}, tag / states_name
    )
    for r in range(world):
        optim = {"zero_stage": stage, "partition_count": [world] * len(shapes), key: ranks[r]}
        torch.save({"optimizer_state_dict": optim}, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return values


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("world", [1, 3, 4])
def test_layout_any_world_size(tmp_path, stage, world):
    shapes = [{"a": (7, 3), "b": (5,)}, {"c": (2, 11), "d": (1,), "e": (13, 1)}]
    values = synthetic(tmp_path, stage, world, shapes)
    entries = deepspeed_tensors(tmp_path)
    assert list(entries) == list(values)  # `module.` off (every name has it), order kept
    assert {e.dtype for e in entries.values()} == {torch.bfloat16}  # from the config: `module` is empty
    got = read_tensors(tmp_path, list(values))
    for name, value in values.items():
        assert torch.equal(got[name], value), name


def test_fp16_training_is_written_in_fp16(tmp_path):
    """fp16 DeepSpeed does not run on CPU ("Type fp16 is not supported on your device"): the dtype rule is checked
    on a synthetic checkpoint whose config enables fp16 (the master weights stay fp32)."""
    values = synthetic(tmp_path, 2, 3, [{"a": (7, 3)}], precision="fp16")
    assert deepspeed_tensors(tmp_path)["a"].dtype == torch.float16
    assert torch.equal(read_tensors(tmp_path, ["a"])["a"], values["a"])


def test_partitions_that_do_not_fit_the_shapes(tmp_path):
    synthetic(tmp_path, 3, 2, [{"a": (4, 4)}])
    path = tmp_path / "global_step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states = torch.load(path)
    states["param_shapes"] = [{"module.a": torch.Size([4, 6])}]
    torch.save(states, path)
    with pytest.raises(DeepSpeedCheckpointError, match="needs 12 elements per rank.*hold 8"):
        read_checkpoint(tmp_path)


# --- memory: a base ~3000x the adapter ---------------------------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from shardsave.formats.deepspeed import read_tensors

    def status(field):
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    folder, names, how = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    base = status("VmRSS")
    if how == "reader":
        got = read_tensors(folder, names)
    else:  # what a plain torch.load of the model states costs
        got = torch.load(folder + "/global_step2/mp_rank_00_model_states.pt", weights_only=False)
    print(json.dumps({"peak": status("VmHWM") - base}))
    """
)


def peak_above_baseline(folder: Path, names: list[str], how: str) -> int:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), json.dumps(names), how],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_memory_stays_near_the_adapter_size(saves):
    folder = saves / "big"
    live = expected(saves, "big")
    adapter = sum(v.numel() * 4 for v in live.values())
    base = (folder / "global_step2" / "mp_rank_00_model_states.pt").stat().st_size
    assert base > 2000 * adapter
    ours = peak_above_baseline(folder, list(live), "reader")
    plain = peak_above_baseline(folder, list(live), "plain")
    print(
        f"\nadapter {adapter} B, model states {base / 2**20:.1f} MiB: reader peak +{ours / 2**20:.1f} MiB, "
        f"plain torch.load +{plain / 2**20:.1f} MiB"
    )
    assert ours < 2 * adapter + 16 * 2**20
    assert plain > base / 2  # the measurement sees a materialised base
    got = read_tensors(folder, list(live))
    assert all(torch.equal(got[n], live[n]) for n in live)


# --- the rescue: python -m shardsave.merge on these checkpoints ----------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["zero1", "zero2", "zero3_excluded", "zero2_bf16_excluded", "zero3_bf16", "zero3_embed"]
)
def test_rescue_writes_what_save_pretrained_wrote(saves, kind, tmp_path):
    """The adapter rescued from the checkpoint is, byte for byte, shardsave.save_pretrained's of the live model at
    the same step (bf16: the cast of the master weights, which the live bf16 parameters are)."""
    folder = saves / kind
    code, err = rescue(folder, "-o", tmp_path / "out", "--base", folder / "base")
    assert code == 0, err
    same_files(folder / "reference", tmp_path / "out")
    if kind == "zero3_embed":  # the frozen embedding came from the ZeRO-3 fragments, the copy from the partitions
        from safetensors import safe_open

        with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
        assert "base_model.model.lm_head.weight" in keys


def test_rescue_from_tag_folder_with_config_in_parent_and_dtype(saves, tmp_path):
    folder = saves / "zero3_bf16"
    code, err = rescue(folder / "global_step2", "-o", tmp_path / "out", "--base", folder / "base", "--dtype", "float32")
    assert code == 0, err
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in got.values())
    reference = load_file(folder / "reference" / "adapter_model.safetensors")
    assert set(got) == set(reference)
    assert all(torch.equal(got[k].to(torch.bfloat16), reference[k]) for k in got)
    assert any(not torch.equal(got[k], reference[k].float()) for k in got)  # the fp32 masters, not an upcast


def test_rescue_refuses_bad_inputs(saves, tmp_path):
    """Exit 2, the file and the problem named, nothing written."""
    out = tmp_path / "out"
    base = saves / "zero2" / "base"
    copy = tmp_path / "ckpt"
    shutil.copytree(saves / "zero2", copy)
    (copy / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    cases = [
        ((copy, "--base", base), "zero_pp_rank_1_mp_rank_00_optim_states.pt"),  # a rank's file missing
        ((saves / "zero2", "--tag", "global_step7", "--base", base), "global_step7"),  # no such tag
        ((saves / "zero2_embed_excluded", "--base", saves / "zero2_embed_excluded" / "base"), "exclude_frozen"),
        ((tmp_path / "nothing", "--base", base), "does not exist"),
    ]
    config = json.loads((saves / "zero2" / "adapter_config.json").read_text())
    for name, change, words in [
        ("other_r", {"r": 6}, "r=6"),
        ("fewer_targets", {"target_modules": ["q_proj"]}, "does not describe"),
        ("more_targets", {"target_modules": ["q_proj", "k_proj", "v_proj"]}, "does not have"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, **change}))
        cases.append(((saves / "zero2", "--adapter-config", tmp_path / name, "--base", base), words))
    no_config = tmp_path / "no_config"
    shutil.copytree(saves / "zero2" / "global_step2", no_config / "global_step2")
    (no_config / "latest").write_text("global_step2")
    cases.append(((no_config, "--base", base), "no adapter_config.json found"))
    for args, words in cases:
        code, err = rescue(*args, "-o", out)
        assert code == 2 and words in err, (args, err)
        assert not out.exists()
