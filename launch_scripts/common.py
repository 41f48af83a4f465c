"""Shared by the launch scripts: a tiny Llama with LoRA, a few training steps, and the two ways to save
(gathered, and per-rank shards then merged), checked by loading both results with PEFT.

CPU with gloo by default; on GPUs when CUDA is present (one GPU per rank, NCCL).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs: nothing is downloaded

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import shardsave  # noqa: E402

shardsave.enable_logging()  # the library is quiet by default; the README's log lines need this switch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: %(default)s)")
    p.add_argument("--lora", type=Path, default=ROOT / "configs" / "lora_qv.json", help="LoRA preset (JSON)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--resume",
        action="store_true",
        help="first load the adapter a previous run saved in OUT/adapter (any backend, any world size) with "
        "shardsave.load_pretrained, and check the model reproduces that run's logits",
    )
    return p


def device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config)


def lora_model(preset: Path):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base_model(), LoraConfig(**json.loads(Path(preset).read_text())))


def batches(rank: int, steps: int, dev: torch.device):
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (2, 16), generator=gen).to(dev)
        yield {"input_ids": ids, "labels": ids}


def train(model, rank: int, steps: int, dev: torch.device, *, backward=None, step=None) -> None:
    """A few AdamW steps on random tokens. `backward(loss)` / `step()` default to `loss.backward()` and an
    AdamW step over the trainable parameters (DeepSpeed and accelerate pass their own)."""
    if step is None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step():
            opt.step()
            opt.zero_grad()

    backward = backward or (lambda loss: loss.backward())
    model.train()
    for i, batch in enumerate(batches(rank, steps, dev)):
        loss = model(**batch).loss
        backward(loss)
        step()
        if rank == 0:
            print(f"step {i}: loss {loss.item():.4f} ({type(model).__name__})")


def probe_logits(model, dev: torch.device) -> torch.Tensor:
    """Logits of the (sharded) training model on a fixed input; every rank must call it."""
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7)).to(dev)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def save_both_ways(model, out: Path, rank: int, is_main_process: bool | None = None) -> tuple[Path, Path]:
    """The gathered save and the shard save + merge; every rank calls it."""
    adapter, shards, merged = out / "adapter", out / "shards", out / "merged"
    if rank == 0:
        shutil.rmtree(merged, ignore_errors=True)
    shardsave.save_pretrained(model, adapter, is_main_process=is_main_process)
    shardsave.save_shards(model, shards)
    if rank == 0:
        shardsave.merge_shards(shards, merged)
    dist.barrier()
    return adapter, merged


def check_with_peft(expected: torch.Tensor, *directories: Path) -> bool:
    """Load each adapter with PEFT on a fresh base model and compare with the training model's logits."""
    from peft import PeftModel

    ok = True
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    for directory in directories:
        loaded = PeftModel.from_pretrained(base_model(), str(directory)).eval()
        with torch.no_grad():
            got = loaded(input_ids=ids).logits.float()
        diff = (got - expected).abs().max().item()
        match = torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
        print(f"PeftModel.from_pretrained({directory}): logits match the trained model: {match} (max diff {diff:.1e})")
        ok &= match
    same = (directories[0] / "adapter_model.safetensors").read_bytes() == (
        directories[-1] / "adapter_model.safetensors"
    ).read_bytes()
    print(f"gathered and merged adapter_model.safetensors identical: {same}")
    return ok and same


def resume(model, out: Path, rank: int, dev: torch.device) -> bool:
    """Load the adapter of a previous run (`OUT/adapter`) into the wrapped model; True when it then gives the
    logits that run saved."""
    shardsave.load_pretrained(model, out / "adapter")
    got, saved = probe_logits(model, dev), torch.load(out / "logits.pt")
    match = torch.allclose(got, saved, atol=1e-4, rtol=1e-4)
    if rank == 0:
        print(f"resumed from {out / 'adapter'}: logits match the saved run's: {match}")
    return match


def run(
    model, out: Path, rank: int, dev: torch.device, steps: int, *, is_main_process=None, resume_from=False, **hooks
) -> None:
    """What every launch script does once the model is wrapped: (resume,) train, save both ways, check with
    PEFT, exit non-zero on rank 0 if a check fails."""
    resumed = resume(model, out, rank, dev) if resume_from else True
    train(model, rank, steps, dev, **hooks)
    expected = probe_logits(model, dev)
    adapter, merged = save_both_ways(model, out, rank, is_main_process=is_main_process)
    if rank == 0:
        torch.save(expected, out / "logits.pt")  # for a later --resume
    finish(rank != 0 or (resumed and check_with_peft(expected, adapter, merged)), rank)


def finish(ok: bool, rank: int) -> None:
    if rank == 0:
        print("OK: both saves load with PEFT and reproduce the trained model." if ok else "MISMATCH")
    dist.destroy_process_group()
    if rank == 0 and not ok:
        sys.exit(1)
