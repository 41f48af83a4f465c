"""Tiny models and PEFT comparisons used by the tests (and by the multi-rank workers)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

VOCAB = 96


def llama_config(*, tie: bool = False, bias: bool = False, vocab: int = VOCAB, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
        pad_token_id=0,
        num_labels=3,
    )


def base_model(*, seed: int = 0, seq_cls: bool = False, **config_kwargs):
    torch.manual_seed(seed)
    cls = LlamaForSequenceClassification if seq_cls else LlamaForCausalLM
    model = cls(llama_config(**config_kwargs))
    return model.eval()


def randomize_trainable(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every trainable tensor (LoRA A and B, magnitudes, copies, token deltas) non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1)


def with_adapters(base, lora_config, adapters=()):
    """`get_peft_model` plus `add_adapter` for each (name, config) pair, every adapter trainable (PEFT leaves the
    added ones frozen), so that all of them get values."""
    model = get_peft_model(base, lora_config)
    for name, cfg in adapters:
        model.add_adapter(name, cfg)
    for n, p in model.named_parameters():
        if any(f".{a}." in n or n.endswith(f".{a}") for a in model.peft_config):
            p.requires_grad_(True)
    return model


def peft_model(lora_config, *, seed: int = 0, seq_cls: bool = False, dtype=None, adapters=(), **config_kwargs):
    """A PeftModel on a tiny Llama with random adapter weights. `adapters` adds (name, config) pairs."""
    model = with_adapters(base_model(seed=seed, seq_cls=seq_cls, **config_kwargs), lora_config, adapters)
    randomize_trainable(model)
    if dtype is not None:  # the whole model in half precision, adapters included (no fp32 autocast)
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()


def set_fields(config) -> set[str]:
    return {k for k, v in asdict(config).items() if isinstance(v, set)}


def normalized_config(path: Path, set_valued: set[str]) -> dict:
    data = json.loads(Path(path).read_text())
    for key in set_valued:
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key], key=str)
    return data


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def assert_same_files(ours: Path, theirs: Path, model: PeftModel) -> None:
    """Same file list; weights and card byte for byte; configs equal as JSON (set order aside)."""
    assert files_under(ours) == files_under(theirs)
    for rel in files_under(theirs):
        a, b = Path(ours, rel), Path(theirs, rel)
        if rel.endswith("adapter_config.json"):
            name = Path(rel).parent.name if "/" in rel else "default"
            fields = set_fields(model.peft_config[name])
            assert normalized_config(a, fields) == normalized_config(b, fields), rel
        elif rel.endswith(".bin"):
            sd_a = torch.load(a, weights_only=True)
            sd_b = torch.load(b, weights_only=True)
            assert list(sd_a) == list(sd_b), rel
            for k in sd_b:
                assert sd_a[k].dtype == sd_b[k].dtype and torch.equal(sd_a[k], sd_b[k]), (rel, k)
        else:
            assert a.read_bytes() == b.read_bytes(), rel


def logits(model, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 7), generator=gen)
    device = next(iter(model.parameters())).device
    with torch.no_grad():
        return model(input_ids=ids.to(device)).logits.float().cpu()


def load_and_compare(
    model: PeftModel,
    directory: Path,
    *,
    seq_cls: bool = False,
    adapter: str = "default",
    atol: float = 1e-5,
    dtype=None,
    **config_kwargs,
) -> None:
    """Load `directory` onto a fresh base with PEFT and check it reproduces `model`'s logits."""
    sub = Path(directory) if adapter == "default" else Path(directory, adapter)
    base = base_model(seq_cls=seq_cls, **config_kwargs)
    if dtype is not None:
        base.to(dtype)
    loaded = PeftModel.from_pretrained(base, str(sub), adapter_name=adapter, autocast_adapter_dtype=False)
    loaded.eval()
    model.set_adapter(adapter)
    try:
        expected = logits(model)
    finally:
        model.set_adapter("default")
    torch.testing.assert_close(logits(loaded), expected, atol=atol, rtol=1e-4)


def pissa_model(lora_kwargs: dict, *, init: str = "pissa", seed: int = 0, dtype=None, **config_kwargs):
    """A PiSSA/OLoRA-initialised PeftModel (base weights mutated to W_res), its initial adapter saved with
    `save_initial(dir)`, then `train_a_little()` to move the adapter away from the initial values."""
    from peft import LoraConfig

    model = get_peft_model(base_model(seed=seed, **config_kwargs), LoraConfig(init_lora_weights=init, **lora_kwargs))
    if dtype is not None:
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()


def save_initial(model, directory) -> None:
    """What PEFT's docs ask for: the adapter right after initialisation, with init_lora_weights=True."""
    import copy

    config = model.peft_config["default"]
    saved = copy.deepcopy(config)
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(directory))
    finally:
        model.peft_config["default"] = saved


def train_a_little(model, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))
