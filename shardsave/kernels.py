"""Fill the packed host-transfer buffer, converting on the way: one Triton launch per dtype on CUDA, the
same segments with plain torch elsewhere (the reference, and the CPU path).

Every output tensor is a segment of the packed buffer seen as `rows x (c1 + c2)`: the first `c1` columns
come from `x` (the trained tensor), the last `c2` from `y` (the initial tensor), negated when `neg`. A plain
copy is `c2 = 0`; PiSSA's A' = [A; A0] is one row of `numel(A) + numel(A0)`; B' = [B, -B0] is `out` rows of
`r + r0` with `neg`. A LoRA adapter has hundreds of small tensors, so one launch for all of them is what
keeps the conversion close to the cost of the copy itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Segment", "fill_segments", "triton_available"]


@dataclass(frozen=True, slots=True)
class Segment:
    offset: int  # bytes into the packed buffer (aligned to 16)
    x: torch.Tensor
    y: torch.Tensor | None
    rows: int
    c1: int
    c2: int
    neg: bool

    @property
    def nbytes(self) -> int:
        return self.rows * (self.c1 + self.c2) * self.x.element_size()


def _fill_torch(packed: torch.Tensor, s: Segment) -> None:
    out = packed[s.offset : s.offset + s.nbytes].view(s.x.dtype).view(s.rows, s.c1 + s.c2)
    out[:, : s.c1].copy_(s.x.reshape(s.rows, s.c1))
    if s.c2:
        y = s.y.reshape(s.rows, s.c2)
        torch.neg(y, out=out[:, s.c1 :]) if s.neg else out[:, s.c1 :].copy_(y)


def triton_available(device: torch.device) -> bool:
    """Triton is used on CUDA when importable, unless `SHARDSAVE_NO_TRITON=1`."""
    if os.environ.get("SHARDSAVE_NO_TRITON") == "1":
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_KERNEL = None
_BLOCK = 1024


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def convert_segments(
            out_ptr, x_addrs, y_addrs, meta_ptr, WORD: tl.constexpr, SIGN: tl.constexpr, BLOCK: tl.constexpr
        ):
            seg = tl.program_id(0)
            start = tl.program_id(1) * BLOCK
            out_off = tl.load(meta_ptr + seg * 5 + 0)
            rows = tl.load(meta_ptr + seg * 5 + 1)
            c1 = tl.load(meta_ptr + seg * 5 + 2)
            c2 = tl.load(meta_ptr + seg * 5 + 3)
            neg = tl.load(meta_ptr + seg * 5 + 4)
            width = c1 + c2
            idx = start + tl.arange(0, BLOCK)
            mask = idx < rows * width
            row = idx // width
            col = idx % width
            x = tl.load(x_addrs + seg).to(tl.pointer_type(WORD))
            y = tl.load(y_addrs + seg).to(tl.pointer_type(WORD))
            from_x = col < c1
            vx = tl.load(x + row * c1 + col, mask=mask & from_x, other=0)
            vy = tl.load(y + row * c2 + (col - c1), mask=mask & (col >= c1), other=0)
            vy = tl.where(neg != 0, vy ^ SIGN, vy)  # negation = flipping the sign bit: exact, any float
            tl.store(out_ptr + out_off + idx, tl.where(from_x, vx, vy), mask=mask)

        _KERNEL = convert_segments
    return _KERNEL


def _word(dtype: torch.dtype):
    """The integer word a float dtype is moved as, and its sign bit: the kernel never does float arithmetic."""
    import triton.language as tl

    return {
        torch.float32: (torch.int32, tl.int32, -(2**31)),
        torch.float16: (torch.int16, tl.int16, -(2**15)),
        torch.bfloat16: (torch.int16, tl.int16, -(2**15)),
        torch.float64: (torch.int64, tl.int64, -(2**63)),
    }.get(dtype)


def _fill_triton(packed: torch.Tensor, segments: list[Segment]) -> None:
    word_torch, word_tl, sign = _word(segments[0].x.dtype)
    itemsize = segments[0].x.element_size()
    out = packed[: packed.numel() // itemsize * itemsize].view(word_torch)
    xs = [s.x.contiguous() for s in segments]
    ys = [(s.y if s.y is not None else s.x).contiguous() for s in segments]
    device = packed.device
    x_addrs = torch.tensor([t.data_ptr() for t in xs], dtype=torch.int64, device=device)
    y_addrs = torch.tensor([t.data_ptr() for t in ys], dtype=torch.int64, device=device)
    meta = torch.tensor(
        [[s.offset // itemsize, s.rows, s.c1, s.c2, int(s.neg)] for s in segments], dtype=torch.int64, device=device
    ).reshape(-1)
    longest = max(s.rows * (s.c1 + s.c2) for s in segments)
    grid = (len(segments), -(-longest // _BLOCK))
    _kernel()[grid](out, x_addrs, y_addrs, meta, WORD=word_tl, SIGN=sign, BLOCK=_BLOCK)


def fill_segments(packed: torch.Tensor, segments: list[Segment], *, use_triton: bool | None = None) -> None:
    """Write every segment into `packed` (uint8, on the segments' device)."""
    if not segments:
        return
    if use_triton is None:
        use_triton = triton_available(packed.device)
    groups: dict[torch.dtype, list[Segment]] = {}
    for s in segments:
        groups.setdefault(s.x.dtype, []).append(s)
    for dtype, group in groups.items():
        if use_triton and _word(dtype) is not None:
            _fill_triton(packed, group)
        else:
            for s in group:
                _fill_torch(packed, s)
