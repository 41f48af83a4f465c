"""The fused conversion kernel equals the torch reference: on CPU through Triton's interpreter (a
subprocess, since TRITON_INTERPRET must be set before triton is imported), on CUDA for real. Its launch
geometry is a pure function, tested at sizes no test machine could fill."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardsave.tensors.kernels import MAX_PROGRAMS, Segment, _copy_plain, _fill_torch, fill_segments, launch_geometry

HERE = Path(__file__).parents[1] / "helpers"
SIZES = [3, 10**9, 0, 1, 4097] + [37 + i % 50 for i in range(2000)]  # a 10^9-element lm_head among small ones


def _check_geometry(sizes: list[int], block: int, max_programs: int = MAX_PROGRAMS):
    launch = launch_geometry(sizes, block, max_programs)
    assert len(launch.starts) == len(sizes) + 1  # the table grows with the segments, not their elements
    assert launch.starts[0] == 0 and launch.grid <= max_programs
    size = torch.tensor(sizes, dtype=torch.int64)
    blocks = torch.tensor(launch.starts, dtype=torch.int64).diff()
    # every element in one block, and at most one partial block per segment (none for an empty one)
    assert bool((blocks * block >= size).all()) and bool(((blocks - 1) * block < size.clamp(min=1)).all())
    # programs x steps cover blocks 0..blocks-1, fewer than `steps` slots left idle
    assert launch.grid * launch.steps >= launch.blocks > launch.grid * launch.steps - launch.steps
    return launch, size


def test_launch_geometry_covers_a_billion_element_segment_on_axis_x():
    launch, size = _check_geometry(SIZES, 1024)
    assert launch.steps == 1 and launch.grid == launch.blocks  # one block per program
    # the kernel's lookup (the last segment whose first block <= b): each block's first element is in its segment
    starts = torch.tensor(launch.starts, dtype=torch.int64)
    b = torch.arange(launch.blocks, dtype=torch.int64)
    seg = torch.searchsorted(starts[:-1], b, right=True) - 1
    assert bool(((b - starts[seg]) * launch.block < size[seg]).all())
    assert torch.equal(torch.bincount(seg, minlength=len(SIZES)), starts.diff())
    assert launch.search >= 1 and 2**launch.search >= len(SIZES)  # binary search steps narrow to one segment


def test_launch_geometry_strides_when_blocks_outnumber_programs():
    launch, _ = _check_geometry(SIZES, 1024, max_programs=1000)
    assert launch.steps > 1
    b = torch.arange(launch.grid)[:, None] + torch.arange(launch.steps)[None, :] * launch.grid
    b = b.flatten()
    assert torch.equal(b[b < launch.blocks].sort().values, torch.arange(launch.blocks))  # each block exactly once
    # past CUDA's own limit: 2^42 elements in blocks of 1024 outnumber 2^31 - 1 programs
    launch, _ = _check_geometry([2**42 + 5, 7], 1024)
    assert launch.blocks > MAX_PROGRAMS and launch.steps > 1


def test_launch_geometry_rejects_empty_blocks():
    with pytest.raises(ValueError, match="block"):
        launch_geometry([10], 0)


def _segments(dtype: torch.dtype, shapes) -> tuple[list[Segment], int]:
    segments, offset = [], 0
    for rows, c1, c2, neg in shapes:
        x = torch.randn(rows, c1).to(dtype)
        y = torch.randn(rows, c2).to(dtype) if c2 else None
        segments.append(Segment(offset, x, y, rows, c1, c2, neg))
        offset += -(-segments[-1].nbytes // 16) * 16
    return segments, offset + 16


def test_plain_copies_match_torch_reference():
    segments, size = [], 0
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        part, _ = _segments(dtype, [(1, 33, 0, False), (1, 0, 0, False), (1, 1500, 0, False)])
        segments += [Segment(s.offset + size, s.x, s.y, s.rows, s.c1, s.c2, s.neg) for s in part]
        size = segments[-1].offset + -(-segments[-1].nbytes // 16) * 16
    segments.append(Segment(size, torch.randn(6, 4).t(), None, 1, 24, 0, False))  # not contiguous
    size += 16 * 7
    a, b, c = (torch.zeros(size, dtype=torch.uint8) for _ in range(3))
    _copy_plain(a, segments)
    for s in segments:
        _fill_torch(b, s)
    fill_segments(c, segments, use_triton=True)  # plain copies never reach Triton
    assert torch.equal(a, b) and torch.equal(c, b)


def test_triton_kernel_matches_torch_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(HERE.parents[1]))
    proc = subprocess.run([sys.executable, str(HERE / "kernel_check.py")], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0 and "kernel ok" in proc.stdout, proc.stdout + proc.stderr


def test_triton_kernel_addresses_in_64_bit(tmp_path, monkeypatch):
    """Compiled for sm_90 without a GPU: every block of addresses is offset in 64-bit (32-bit ones wrap past
    2^31 elements), which the interpreter, computing in numpy, would not show."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from shardsave.tensors.kernels import _COLUMNS, _kernel

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    try:
        from triton.backends.compiler import GPUTarget

        signature = {"out_ptr": "*i16", "table": "*i64", "n_segments": "i32", "grid": "i32", "steps": "i32",
                     "search": "i32", "WORD": "constexpr", "SIGN": "constexpr", "BLOCK": "constexpr",
                     "COLUMNS": "constexpr"}  # fmt: skip
        constants = {"WORD": tl.int16, "SIGN": -(2**15), "BLOCK": 1024, "COLUMNS": _COLUMNS}
        source = triton.compiler.ASTSource(fn=_kernel(), signature=signature, constexprs=constants)
        ttir = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ttir"]
    except Exception as e:  # no CUDA backend or toolchain in this triton: nothing to inspect
        pytest.skip(f"cannot compile for CUDA here: {e!r}")
    offsets = re.findall(r"tt\.addptr %\S+, (%\S+) : ([^,]+), (\S+)", ttir)
    assert any(t.startswith("tensor<") for _, t, _ in offsets)
    for name, _, offset_type in offsets:
        assert "i64" in offset_type or re.fullmatch(r"%c\d+_i32", name), (name, offset_type)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_conversion_on_cuda_matches_cpu_reference():
    pytest.importorskip("triton")
    from shardsave.tensors.convert import convert_tensor
    from shardsave.tensors.host import to_host

    trained = {"m.q.lora_A.weight": torch.randn(8, 64), "m.q.lora_B.weight": torch.randn(64, 8),
               "m.head.weight": torch.randn(10, 64)}  # fmt: skip
    initial = {k: torch.randn_like(v) for k, v in trained.items() if "lora" in k}
    host = to_host({k: v.cuda() for k, v in trained.items()}, initial)
    for key, tensor in trained.items():
        assert host[key].device.type == "cpu"
        assert torch.equal(host[key], convert_tensor(key, tensor, initial.get(key)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_segments_past_grid_and_32_bit_limits_on_cuda():
    """A conversion over 2^31 elements (offsets past 32 bits, blocks past CUDA's 65,535 on axis y), a plain copy
    over 65,535 x 1,024 elements (an lm_head in modules_to_save), small segments after both."""
    pytest.importorskip("triton")
    half = 2**30 + 3
    if torch.cuda.mem_get_info()[0] < 8 * half * 2:
        pytest.skip("needs about 16 GB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1, 70_000_000, 0, False), (1, half, half, False), (3, 5, 2, True), (1, 10, 7, False)]
    segments, offset = [], 0
    for rows, c1, c2, neg in shapes:
        x = torch.randn(rows, c1, device="cuda", dtype=torch.bfloat16, generator=g)
        y = torch.randn(rows, c2, device="cuda", dtype=torch.bfloat16, generator=g) if c2 else None
        segments.append(Segment(offset, x, y, rows, c1, c2, neg))
        offset += -(-segments[-1].nbytes // 16) * 16
    fused = torch.zeros(offset, dtype=torch.uint8, device="cuda")
    fill_segments(fused, segments, use_triton=True)
    reference = torch.zeros_like(fused)
    fill_segments(reference, segments, use_triton=False)
    assert torch.equal(fused, reference)
