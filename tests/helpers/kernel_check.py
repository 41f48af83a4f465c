"""Run with TRITON_INTERPRET=1 (set before triton is imported): the Triton conversion kernel against the
torch reference, on CPU tensors. Prints 'kernel ok' on success."""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

from shardsave.tensors.convert import convert_tensor  # noqa: E402
from shardsave.tensors.host import pack_to_host as _pack_to_host  # noqa: E402
from shardsave.tensors.kernels import Segment, _fill_torch, _fill_triton, fill_segments, triton_available  # noqa: E402

torch.manual_seed(0)
assert triton_available(torch.device("cpu"))

for dtype in (torch.float32, torch.bfloat16, torch.float16):
    trained = {
        "m.q.lora_A.weight": torch.randn(4, 33).to(dtype),
        "m.q.lora_B.weight": torch.randn(17, 4).to(dtype),
        "m.e.lora_embedding_A": torch.randn(4, 50).to(dtype),
        "m.e.lora_embedding_B": torch.randn(9, 4).to(dtype),
        "m.lm_head.weight": torch.randn(3, 1500).to(dtype),  # kept: a plain copy segment spanning 2 blocks
    }
    initial = {k: torch.randn_like(v.float()) for k, v in trained.items() if "lm_head" not in k}
    packed = _pack_to_host(trained, initial)  # takes the Triton path: TRITON_INTERPRET makes CPU eligible
    for key, tensor in trained.items():
        expected = convert_tensor(key, tensor, initial.get(key))
        assert packed[key].dtype == dtype and torch.equal(packed[key], expected), (dtype, key)

    # the same segments, kernel against torch, directly
    x, y = torch.randn(5, 3).to(dtype), torch.randn(5, 2).to(dtype)
    segs = [Segment(0, x, y, 5, 3, 2, True), Segment(64, y, x, 1, 10, 15, False)]
    a = torch.zeros(256, dtype=torch.uint8)
    b = torch.zeros(256, dtype=torch.uint8)
    fill_segments(a, segs, use_triton=True)
    fill_segments(b, segs, use_triton=False)
    assert torch.equal(a, b), dtype

    # small blocks and few programs: segments of several blocks, blocks of several programs' steps (grid-stride)
    shapes = [
        (5, 3, 2, True),
        (1, 10, 15, False),
        (7, 20, 13, True),
        (0, 3, 2, True),
        (1, 40, 37, False),
        (2, 1, 9, True),
    ]
    segs, offset = [], 0
    for rows, c1, c2, neg in shapes:
        x, y = torch.randn(rows, c1).to(dtype), torch.randn(rows, c2).to(dtype)
        segs.append(Segment(offset, x, y, rows, c1, c2, neg))
        offset += -(-segs[-1].nbytes // 16) * 16
    a = torch.zeros(offset + 16, dtype=torch.uint8)
    b = torch.zeros(offset + 16, dtype=torch.uint8)
    _fill_triton(a, segs, block=16, max_programs=5)
    for s in segs:
        _fill_torch(b, s)
    assert torch.equal(a, b), dtype
print("kernel ok")
