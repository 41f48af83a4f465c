"""The offline merge (`python -m shardsave.merge SRC --into BASE`) and its arithmetic (`shardsave.tensors.merge_math`)
against PEFT's own `merge_and_unload().save_pretrained()` of the same base and adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from tiny import base_model, files_under, logits, peft_model, randomize_trainable
from transformers import AutoModelForCausalLM

from shardsave.cli.merge import main
from shardsave.formats.hf_base import describe_plain_base
from shardsave.merged import offline
from shardsave.merged.offline import merge_into
from shardsave.plan import merge_steps
from shardsave.tensors import merge_math

SHARD = "40KB"  # several shard files for the tiny model


def _reference(base_dir: Path, adapter_dir: Path, out: Path, names=("default",), dtype=None, shard=SHARD):
    """What the issue compares against: PEFT's load + merge_and_unload + save_pretrained."""
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), **({"dtype": dtype} if dtype else {}))
    model = PeftModel.from_pretrained(base, str(adapter_dir if names[0] == "default" else adapter_dir / names[0]),
                                      adapter_name=names[0])  # fmt: skip
    for name in names[1:]:
        model.load_adapter(str(adapter_dir / name), adapter_name=name)
    merged = model.merge_and_unload(adapter_names=list(names))
    merged.save_pretrained(str(out), max_shard_size=shard)
    return merged


def _setup(tmp_path: Path, config: LoraConfig, *, dtype=None, adapters=(), **kwargs) -> tuple[Path, Path]:
    model = peft_model(config, adapters=adapters, **kwargs)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = base_model(**kwargs)
    if dtype is not None:
        base.to(dtype)
    base.save_pretrained(str(base_dir), max_shard_size=SHARD)
    model.save_pretrained(str(adapter_dir), selected_adapters=["default", *(n for n, _ in adapters)])
    return base_dir, adapter_dir


def _assert_same(ours: Path, theirs: Path) -> None:
    assert files_under(ours) == files_under(theirs)
    for rel in files_under(theirs):
        a, b = Path(ours, rel), Path(theirs, rel)
        if rel.endswith(".safetensors"):
            with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
                assert fa.metadata() == fb.metadata() and list(fa.keys()) == list(fb.keys()), rel
                for k in fb.keys():
                    ta, tb = fa.get_tensor(k), fb.get_tensor(k)
                    assert ta.dtype == tb.dtype and torch.equal(ta, tb), (rel, k, (ta.float() - tb.float()).abs().max())
        assert a.read_bytes() == b.read_bytes(), rel  # configs, index and (so) the weights byte for byte


CASES = {
    "lora": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), {}),
    "rslora_patterns": (
        LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "up_proj"],
            rank_pattern={"layers.1.self_attn.q_proj": 2},
            alpha_pattern={"up_proj": 3},
        ),
        {},
    ),  # fmt: skip
    "dora": (LoraConfig(r=4, target_modules=["q_proj", "o_proj"], use_dora=True), {}),
    "modules_to_save": (LoraConfig(r=4, target_modules=["k_proj"], modules_to_save=["lm_head"]), {}),
    "trainable_tokens": (LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 7, 11]), {}),
    "embedding": (LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), {}),
    "lora_bias": (LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), {"bias": True}),
    "tied": (LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), {"tie": True}),
}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_offline_merge_writes_what_peft_writes(tmp_path, case, dtype):
    config, kwargs = CASES[case]
    base_dir, adapter_dir = _setup(tmp_path, config, dtype=dtype, **kwargs)
    merged = _reference(base_dir, adapter_dir, tmp_path / "theirs")
    merge_into(adapter_dir, base_dir, tmp_path / "ours", max_shard_size=SHARD)
    _assert_same(tmp_path / "ours", tmp_path / "theirs")
    if dtype is None:  # the output loads and gives the merged model's logits
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"))
        torch.testing.assert_close(logits(loaded), logits(merged), atol=0, rtol=0)


@pytest.fixture
def described(monkeypatch):
    """Each base's description in the merges that follow: True from its files alone, False by its class."""
    seen = []

    def spy(files, dtype):
        found = describe_plain_base(files, dtype)
        seen.append(found is not None)
        return found

    monkeypatch.setattr(offline, "describe_plain_base", spy)
    return seen


def _by_class(monkeypatch, merge) -> None:
    """`merge()` with the base described by its transformers class, as before the files-only path."""
    with monkeypatch.context() as patch:
        patch.setattr(offline, "_DESCRIBE_FROM_FILES", False)
        merge()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_unsharded_merge_without_transformers_writes_the_same_bytes(tmp_path, monkeypatch, described, case, dtype):
    """An unsharded output of a base the files describe: merged without building the class, it equals the merge
    that builds it, and PEFT's own merge_and_unload().save_pretrained(), byte for byte (then --dtype)."""
    config, kwargs = CASES[case]
    base_dir, adapter_dir = _setup(tmp_path, config, dtype=dtype, **kwargs)
    merged = _reference(base_dir, adapter_dir, tmp_path / "theirs", shard="1GB")
    merge_into(adapter_dir, base_dir, tmp_path / "fast", max_shard_size="1GB")
    _by_class(monkeypatch, lambda: merge_into(adapter_dir, base_dir, tmp_path / "class", max_shard_size="1GB"))
    assert described == [True]
    _assert_same(tmp_path / "fast", tmp_path / "class")
    _assert_same(tmp_path / "fast", tmp_path / "theirs")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fast"))
    merged_logits = logits(merged.float()) if dtype is not None else logits(merged)
    torch.testing.assert_close(logits(loaded.float()), merged_logits, atol=0, rtol=0)
    cli = [str(adapter_dir), "--into", str(base_dir), "--dtype", "float16", "--max-shard-size", "1GB", "-o"]
    assert main([*cli, str(tmp_path / "fast16")]) == 0
    _by_class(monkeypatch, lambda: main([*cli, str(tmp_path / "class16")]))
    assert described == [True, True]
    _assert_same(tmp_path / "fast16", tmp_path / "class16")


def test_sharded_output_is_described_by_the_class(tmp_path, described):
    """A sharded output needs save_pretrained's key order, which the files do not hold: the class is built."""
    base_dir, adapter_dir = _setup(tmp_path, CASES["lora"][0])
    merge_into(adapter_dir, base_dir, tmp_path / "ours", max_shard_size=SHARD)
    assert described == [True] and len(files_under(tmp_path / "ours")) > 3  # described, then built for the order


def test_tied_head_changed_is_refused_either_way(tmp_path, monkeypatch, described, capsys):
    base_dir, adapter_dir = _setup(tmp_path, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                   tie=True)  # fmt: skip
    cli = [str(adapter_dir), "--into", str(base_dir), "-o", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(cli) == 2
    fast = capsys.readouterr().err
    _by_class(monkeypatch, lambda: main(cli))
    assert described == [True] and "ties to" in fast and capsys.readouterr().err == fast
    assert not (tmp_path / "out").exists()


def test_two_adapters_merged_together(tmp_path):
    second = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"], use_dora=False)
    base_dir, adapter_dir = _setup(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]), adapters=[("other", second)])
    _reference(base_dir, adapter_dir, tmp_path / "theirs", names=("default", "other"))
    merge_into(adapter_dir, base_dir, tmp_path / "ours", selected_adapters=["default", "other"], max_shard_size=SHARD)
    _assert_same(tmp_path / "ours", tmp_path / "theirs")


def test_dtype_option_is_from_pretrained_dtype(tmp_path):
    base_dir, adapter_dir = _setup(tmp_path, CASES["lora"][0])
    _reference(base_dir, adapter_dir, tmp_path / "theirs", dtype=torch.bfloat16)
    assert main([str(adapter_dir), "--into", str(base_dir), "-o", str(tmp_path / "ours"), "--dtype", "bfloat16",
                 "--max-shard-size", SHARD]) == 0  # fmt: skip
    _assert_same(tmp_path / "ours", tmp_path / "theirs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_element_ranges_equal_the_whole_tensor(dtype):
    """Any flat range of a tensor merges to the same bits as the whole (DoRA given the whole-row norm)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(12, 10, generator=gen).to(dtype)
    a, b, m = torch.randn(3, 10, generator=gen), torch.randn(12, 3, generator=gen), torch.rand(12, generator=gen) + 1
    tensors = {("x", "A"): a.to(dtype), ("x", "B"): b.to(dtype), ("x", "M"): m.to(dtype)}
    for dora in (False, True):
        step = merge_steps.Step("x", "lora", "p", {"A": "A", "B": "B", **({"magnitude": "M"} if dora else {})}, 0.7)
        whole = merge_math.merge_tensor(base.clone(), base.shape, [step], tensors)
        norms = {"x": merge_math.dora_weight_norm(step, base, merge_math.lora_delta(step, tensors))}
        for start, stop in ((0, 120), (5, 17), (20, 40), (33, 119), (0, 1)):
            part = merge_math.merge_tensor(base.reshape(-1)[start:stop].clone(), base.shape, [step], tensors,
                                           start=start, weight_norms=norms)  # fmt: skip
            assert torch.equal(part, whole.reshape(-1)[start:stop]), (dora, start, stop)
        if dora:
            with pytest.raises(ValueError, match="weight_norms"):
                merge_math.merge_tensor(base.reshape(-1)[5:17].clone(), base.shape, [step], tensors, start=5)


def test_plan_names_the_base_tensor_of_each_adapter_tensor():
    keys = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.model.embed_tokens.base_layer.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.embed_tokens.lora_embedding_B",
            "base_model.model.lm_head.weight"]  # fmt: skip
    with pytest.raises(merge_steps.MergeRefused, match="DoRA on the embedding"):
        merge_steps.plan_adapter({"r": 4, "use_dora": True}, keys)
    plan = merge_steps.plan_adapter({"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}}, keys)
    assert [s.kind for s in plan["model.embed_tokens.weight"]] == ["replace", "embedding"]
    assert plan["lm_head.weight"][0].tensors == {"value": "base_model.model.lm_head.weight"}
    (q,) = plan["model.layers.0.self_attn.q_proj.weight"]
    assert q.dora and q.scaling == 4.0 and set(q.tensors) == {"A", "B", "magnitude"}
    for refused in ({"use_bdlora": True}, {"init_lora_weights": "pissa"}, {"peft_type": "IA3"}):
        with pytest.raises(merge_steps.MergeRefused):
            merge_steps.plan_adapter({"r": 4, **refused}, keys[:2])


def test_bad_inputs_exit_2_and_publish_nothing(tmp_path, capsys):
    base_dir, adapter_dir = _setup(tmp_path, CASES["lora"][0])
    other = tmp_path / "other_base"
    base_model(layers=1).save_pretrained(str(other))  # no layers.1: the adapter does not fit
    out = tmp_path / "out"
    assert main([str(adapter_dir), "--into", str(other), "-o", str(out)]) == 2
    assert "does not fit the base" in capsys.readouterr().err and not out.exists()
    wide = tmp_path / "wide_base"
    from tiny import llama_config

    torch.manual_seed(0)
    cfg = llama_config()
    cfg.hidden_size, cfg.head_dim = 48, 12
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(wide))
    assert main([str(adapter_dir), "--into", str(wide), "-o", str(out)]) == 2
    assert "does not fit the base" in capsys.readouterr().err and not out.exists()
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    Path(base_dir, sorted(set(index["weight_map"].values()))[-1]).unlink()
    assert main([str(adapter_dir), "--into", str(base_dir), "-o", str(out)]) == 2
    assert "missing" in capsys.readouterr().err and not out.exists()
    assert main([str(adapter_dir), "--into", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_full_disk_exits_1_and_publishes_nothing(tmp_path, capsys, monkeypatch):
    import errno

    import shardsave.merged.offline as merged_module

    base_dir, adapter_dir = _setup(tmp_path, CASES["lora"][0])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merged_module, "write_streaming", full)
    out = tmp_path / "out"
    assert main([str(adapter_dir), "--into", str(base_dir), "-o", str(out)]) == 1
    assert "No space left" in capsys.readouterr().err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_background_sync_raises_the_fsync_error_when_left(tmp_path):
    from shardsave.storage.sync import BackgroundSync

    (tmp_path / "a").write_bytes(b"x")
    with pytest.raises(FileNotFoundError), BackgroundSync() as sync:
        sync(tmp_path / "a")
        sync(tmp_path / "missing")


def test_tensors_computed_ahead_stay_within_the_budget():
    import time

    from shardsave.merged.offline import _Ahead

    keys = [f"t{i}" for i in range(12)]
    seen, holder = [], []

    def compute(key):
        while not holder:  # the worker may start before the constructor returns
            time.sleep(0.001)
        seen.append(holder[0]._held)  # this tensor's cost included
        time.sleep(0.002)
        return torch.zeros(1)

    ahead = _Ahead(keys, compute, cost=lambda k: 3, kept=lambda k: 1, budget=5)
    holder.append(ahead)
    try:
        for key in keys:  # the writer: takes each in order, writes it, then asks for the next
            ahead.written()
            assert ahead.take(key).shape == (1,)
            time.sleep(0.003)
    finally:
        ahead.close()
    assert len(seen) == len(keys) and max(seen) <= 5 and not ahead._thread.is_alive()


def test_a_failed_merge_publishes_nothing_and_restores_torch_threads(tmp_path, monkeypatch):
    import shardsave.merged.offline as merged_module

    base_dir, adapter_dir = _setup(tmp_path, CASES["lora"][0])
    threads = torch.get_num_threads()

    def broken(*args, **kwargs):
        raise RuntimeError("merge failed")

    monkeypatch.setattr(merged_module, "merge_tensor", broken)
    with pytest.raises(RuntimeError, match="merge failed"):
        merge_into(adapter_dir, base_dir, tmp_path / "out", max_shard_size=SHARD)
    assert torch.get_num_threads() == threads and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()

    def no_thread(*args, **kwargs):  # as under a process limit: "can't start new thread"
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(merged_module, "_Ahead", no_thread)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        merge_into(adapter_dir, base_dir, tmp_path / "out", max_shard_size=SHARD)
    assert torch.get_num_threads() == threads and not (tmp_path / "out").exists()
    monkeypatch.undo()
    merge_into(adapter_dir, base_dir, tmp_path / "out", max_shard_size=SHARD)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("in_place", [False, True], ids=["swap", "in-place"])
def test_resave_into_an_older_save_leaves_only_the_new_weights(tmp_path, monkeypatch, in_place):
    """`--overwrite` over a previous merged save with another shard size: the folder holds exactly what a save
    into an empty folder writes (no stale model.safetensors, shards, index, pytorch_model.bin or adapter files,
    which transformers would load instead), plus the user's other files; and it loads the new weights."""
    config = CASES["lora"][0]
    base_dir, first = _setup(tmp_path, config)
    second = tmp_path / "second"
    model = peft_model(config)
    randomize_trainable(model, seed=7)
    model.save_pretrained(str(second))
    merged = _reference(base_dir, second, tmp_path / "theirs")
    fresh = {size: merge_into(second, base_dir, tmp_path / f"fresh-{size}", max_shard_size=size)
             for size in ("1GB", SHARD)}  # fmt: skip
    assert len(files_under(fresh[SHARD])) > 3 and "model.safetensors" in files_under(fresh["1GB"])

    out = tmp_path / "out"
    merge_into(first, base_dir, out, max_shard_size="1GB")
    torch.save({"lm_head.weight": torch.zeros(1)}, out / "pytorch_model.bin")  # an older .bin save
    (out / "adapter_config.json").write_text((first / "adapter_config.json").read_text())
    (out / "tokenizer.json").write_text("{}")  # the user's: kept
    if in_place:  # the working directory inside the output: files replaced one by one
        monkeypatch.chdir(out)
    for size in (SHARD, "1GB", SHARD):  # single -> sharded -> single -> sharded
        cli = [str(second), "--into", str(base_dir), "-o", str(out), "--max-shard-size", size, "--overwrite"]
        assert main(cli) == 0
        assert files_under(out) == sorted([*files_under(fresh[size]), "tokenizer.json"]), size
        for rel in files_under(fresh[size]):
            assert (out / rel).read_bytes() == (fresh[size] / rel).read_bytes(), (size, rel)
        loaded = AutoModelForCausalLM.from_pretrained(str(out))
        torch.testing.assert_close(logits(loaded), logits(merged), atol=0, rtol=0)


def test_into_a_base_rescues_a_checkpoint_with_that_base(tmp_path):
    """`--into BASE` from a framework checkpoint whose adapter config names no reachable base: the rescue step
    builds the structure on BASE (as `--base`), so the merge equals the merge of the adapter saved directly."""
    import torch.distributed.checkpoint as dcp
    from tiny import randomize_trainable

    model = peft_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_trainable(model)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "moved-away")  # the training's path
    base_model().save_pretrained(str(tmp_path / "base"), max_shard_size=SHARD)
    model.save_pretrained(str(tmp_path / "adapter"))
    checkpoint = tmp_path / "checkpoint-5"
    dcp.save(model.state_dict(), checkpoint_id=str(checkpoint / "pytorch_model_fsdp_0"))
    model.peft_config["default"].save_pretrained(str(checkpoint))
    merge_into(tmp_path / "adapter", tmp_path / "base", tmp_path / "theirs", max_shard_size=SHARD)
    code = main([str(checkpoint), "--into", str(tmp_path / "base"), "-o", str(tmp_path / "ours"),
                 "--max-shard-size", SHARD, "--no-progress"])  # fmt: skip
    assert code == 0
    _assert_same(tmp_path / "ours", tmp_path / "theirs")
