"""Two gloo ranks under each sharding backend: shardsave's file equals PEFT's single-process save of the
same (natively gathered) weights, and loads into a fresh unsharded model with the sharded model's logits."""

from __future__ import annotations

import pytest
import torch
from backend_checks import check_backend, check_gathered, check_only_adapter_bytes_move, check_shards_merge
from multirank import check_ok, run_ranks
from peft import PeftModel
from tiny import assert_same_files, base_model, files_under, logits

import shardsave

pytestmark = pytest.mark.multirank

QV = {"target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1", "fsdp1_flat", "zero3", "zero2", "zero1", "ddp"])
def test_backend_qv(backend, tmp_path):
    """One run per backend checks the file, gather_state_dict, the shard set and the traffic of a save."""
    results = check_backend(tmp_path, backend, also_gather=True, shards=True)
    assert results[0].result["gathered"] > 0 and results[1].result["gathered"] == 0  # {} off the main process
    check_gathered(tmp_path)
    check_only_adapter_bytes_move(tmp_path, backend)
    check_shards_merge(tmp_path)


VARIANTS = {
    "modules_to_save": dict(lora={"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
    # PEFT's DoRA cannot train under FSDP1 (its forward reads lora_A.weight.shape[1] of a flat view)
    "dora_embed": dict(lora={"target_modules": ["embed_tokens", "q_proj"], "use_dora": True}, skip=("fsdp1",)),
    "tokens_bias": dict(
        lora={"target_modules": ["q_proj"], "trainable_token_indices": [3, 5], "bias": "lora_only"},
        model={"bias": True},
    ),
    "tied_embed": dict(lora={"target_modules": ["v_proj", "embed_tokens"]}, model={"tie": True}),
    "bf16": dict(lora={"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}, dtype="bfloat16"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1", "zero3"])
def test_backend_variants(backend, variant, tmp_path):
    params = dict(VARIANTS[variant])
    if backend in params.pop("skip", ()):
        pytest.skip(f"{variant} cannot be trained under {backend} by PEFT itself")
    check_backend(tmp_path, backend, **params)


@pytest.mark.parametrize(
    "backend,wrappers",
    [
        ("fsdp2", {"compile": True, "checkpointing": True}),
        ("fsdp1", {"checkpointing": True, "pass_inner": True}),
        ("fsdp1_flat", {"compile": True, "pass_inner": True}),
        ("zero3", {"compile": True, "pass_inner": True}),
        ("fsdp2", {"pass_inner": True}),
    ],
)
def test_backend_wrappers(backend, wrappers, tmp_path):
    check_backend(tmp_path, backend, **wrappers)


@pytest.mark.parametrize("backend", ["fsdp1", "fsdp1_flat"])
def test_fsdp1_inner_model_with_root_unit_tensors(backend, tmp_path):
    """Embeddings live in the root FSDP unit; passing the inner PeftModel must still find them."""
    check_backend(
        tmp_path,
        backend,
        pass_inner=True,
        save={"save_embedding_layers": True},
        lora={"target_modules": ["q_proj"], "modules_to_save": ["norm"]},
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, device_id=cuda)")
@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1", "ddp"])
def test_cuda_nccl(backend, tmp_path):
    check_backend(
        tmp_path,
        backend,
        device="cuda",
        lora={"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
        extra_env={"SHARDSAVE_TEST_PG": "nccl"},
    )


@pytest.mark.parametrize("plugin", ["fsdp1", "fsdp2", "deepspeed_zero3"])
def test_accelerate_prepare(plugin, tmp_path):
    """accelerate's prepare() output and accelerator.unwrap_model(...) both save the same, correct file.

    accelerate enables FSDP only on accelerators; on CPU the worker forces its FSDP prepare() path, which
    works for FSDP2 but not FSDP1 (accelerate passes device_id=cpu, which FSDP1 rejects on CPU)."""
    if plugin == "fsdp1" and not torch.cuda.is_available():
        pytest.skip("accelerate's FSDP1 prepare() needs an accelerator")
    results = run_ranks("accelerate_save", tmp_path, plugin=plugin)
    check_ok(results)
    expected_type = {"deepspeed_zero3": "DeepSpeedEngine", "fsdp1": "FullyShardedDataParallel"}.get(plugin)
    assert (
        results[0].result["type"] == expected_type if expected_type else "Distributed" not in results[0].result["type"]
    )
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(tmp_path / "theirs"))
    fake = type("M", (), {"peft_config": {"default": config}})()
    assert_same_files(tmp_path / "ours", tmp_path / "theirs", fake)
    assert_same_files(tmp_path / "ours_inner", tmp_path / "theirs", fake)
    loaded = PeftModel.from_pretrained(base_model(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(loaded), torch.load(tmp_path / "logits.pt"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1", "zero3"])
def test_trainer_callback_under_backend(backend, tmp_path):
    """ShardSaveCallback.on_save as Trainer calls it under FSDP / ZeRO-3 (with the unwrapped model Trainer
    gives callbacks): the checkpoint's adapter is PEFT's save of the same weights and Trainer's other files
    stay; the shards mode writes a set into the checkpoint that merges into the same bytes."""
    lora = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    check_backend(tmp_path, backend, lora=lora, via_callback=True)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "trainer_state.json").read_text() == "{}"
    merged = tmp_path / "merged"
    assert shardsave.merge_shards(checkpoint / "adapter_shards", merged) == merged
    assert files_under(merged) == files_under(tmp_path / "ours")
    for rel in files_under(merged):
        assert (merged / rel).read_bytes() == (checkpoint / rel).read_bytes(), rel


@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1", "zero3", "ddp"])
def test_pissa_conversion_under_backend(backend, tmp_path):
    """Trained from PiSSA under the backend, saved converted: PEFT's single-process conversion of the same
    weights, byte for byte, and the original (unmutated) base plus the file gives the sharded model's logits."""
    check_backend(tmp_path, backend, pissa=True)


@pytest.mark.parametrize("backend", ["fsdp1", "fsdp1_flat"])
def test_save_inside_summon_full_params_is_refused_before_the_gather(backend, tmp_path):
    """A usage error, found while planning: the same clear error on every rank at once, nothing written."""
    results = run_ranks("save_inside_unshard", tmp_path, backend=backend, timeout=30)
    for r in results:
        assert r.result["type"] == "RuntimeError", r.output[-3000:]
        assert "do not save inside summon_full_params()" in r.error
        assert float((tmp_path / f"elapsed-{r.rank}").read_text()) < 10
    assert not (tmp_path / "adapter").exists()
