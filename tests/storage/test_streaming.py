"""The streaming writer produces the bytes of safetensors.torch.save_file."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file

from shardsave.storage.streaming import TensorSpec, write_streaming

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.uint8, torch.int64,
          torch.int32, torch.int16, torch.bool]  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_streaming_matches_save_file(seed, tmp_path):
    rng = random.Random(seed)
    tensors = {}
    for i in range(rng.randint(1, 12)):
        dtype = rng.choice(DTYPES)
        shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))
        name = f"base_model.model.layer{rng.randint(0, 30)}.{rng.choice(['lora_A', 'lora_B', 'x'])}.weight{i}"
        tensors[name] = (torch.randn(shape) * 10).to(dtype)
    metadata = {"format": "pt"} if seed % 2 == 0 else None
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    produced = []
    write_streaming(tmp_path / "ours.safetensors", specs, lambda k: produced.append(k) or tensors[k], metadata=metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(produced) == sorted(tensors)
