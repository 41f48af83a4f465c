"""Demo: train a tiny LoRA model for a few steps, save it with shardsave, load it back with PEFT.

    python launch_scripts/demo.py            # writes ./demo_output/

Checks and prints that the adapter shardsave wrote is byte-identical to PeftModel.save_pretrained's, and
that PeftModel.from_pretrained on a fresh base model reproduces the trained model's logits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models are built from configs; nothing is downloaded

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import shardsave  # noqa: E402


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="where to write (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(args.steps):
        ids = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    model.eval()

    shutil.rmtree(args.out, ignore_errors=True)
    ours, peft_dir = args.out / "shardsave", args.out / "peft"
    shardsave.save_pretrained(model, ours)
    model.save_pretrained(str(peft_dir))
    print(f"shardsave wrote {sorted(p.name for p in ours.iterdir())} to {ours}")

    same = (ours / "adapter_model.safetensors").read_bytes() == (peft_dir / "adapter_model.safetensors").read_bytes()
    print(f"adapter_model.safetensors identical to PEFT's: {same}")

    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(tiny_llama(), str(ours)).eval()
        got = loaded(input_ids=ids).logits
    match = torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    print(
        f"PeftModel.from_pretrained reproduces the trained logits: {match} "
        f"(max abs diff {(got - expected).abs().max().item():.2e})"
    )
    if same and match:
        print("OK: shardsave's adapter matches PEFT's and loads back with PEFT.")
        return 0
    print("MISMATCH", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
