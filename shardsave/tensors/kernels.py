"""Fill the packed host-transfer buffer, converting on the way: on CUDA the plain copies in one torch
`_foreach_copy_` and the conversions in one Triton launch per dtype; the same segments with plain torch
elsewhere (the reference, and the CPU path).

Every output tensor is a segment of the packed buffer seen as `rows x (c1 + c2)`: the first `c1` columns
come from `x` (the trained tensor), the last `c2` from `y` (the initial tensor), negated when `neg`. A plain
copy is `c2 = 0`; PiSSA's A' = [A; A0] is one row of `numel(A) + numel(A0)`; B' = [B, -B0] is `out` rows of
`r + r0` with `neg`. A LoRA adapter has hundreds of small tensors, so one launch for all of them is what
keeps the conversion close to the cost of the copy itself.

The launch is a 1-D grid over the blocks of all segments together (`launch_geometry`): a program finds its
segment by binary search in a prefix sum of the segments' block counts, so no program waits on a longer
neighbour and a segment may have any number of blocks (a 2-D grid caps it at CUDA's 65,535 on axis y).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["MAX_PROGRAMS", "Launch", "Segment", "fill_segments", "launch_geometry", "triton_available"]


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
    def numel(self) -> int:
        return self.rows * (self.c1 + self.c2)

    @property
    def nbytes(self) -> int:
        return self.numel * self.x.element_size()


MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid axis x


@dataclass(frozen=True, slots=True)
class Launch:
    """Where each program of a 1-D grid works: block `b = program + step * grid` (for `step < steps`, while
    `b < blocks`) is block `b - starts[i]` of the segment `i` with `starts[i] <= b < starts[i + 1]`."""

    block: int
    starts: tuple[int, ...]
    """Prefix sum of the segments' block counts (`ceil(numel / block)`), from 0 to the total: one entry per
    segment plus one, whatever the segments' sizes."""
    grid: int
    """Programs on axis 0, at most `MAX_PROGRAMS`."""
    steps: int
    """Blocks each program covers (grid-stride), 1 unless the blocks outnumber `MAX_PROGRAMS`."""

    @property
    def blocks(self) -> int:
        return self.starts[-1]

    @property
    def search(self) -> int:
        """Halvings that narrow `[0, len(segments) - 1]` to one segment."""
        return (len(self.starts) - 2).bit_length()


def launch_geometry(sizes: Sequence[int], block: int, max_programs: int = MAX_PROGRAMS) -> Launch:
    """The launch that covers segments of `sizes` elements with blocks of `block`: each element in one block,
    at most one partial block per segment, and a grid within `max_programs` (programs stride when it is not)."""
    if block < 1 or max_programs < 1:
        raise ValueError(f"launch_geometry: block ({block}) and max_programs ({max_programs}) must be positive")
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // block))
    steps = max(1, -(-starts[-1] // max_programs))
    return Launch(block, tuple(starts), -(-starts[-1] // steps), steps)


def _fill_torch(packed: torch.Tensor, s: Segment) -> None:
    out = packed[s.offset : s.offset + s.nbytes].view(s.x.dtype).view(s.rows, s.c1 + s.c2)
    out[:, : s.c1].copy_(s.x.reshape(s.rows, s.c1))
    if s.c2:
        y = s.y.reshape(s.rows, s.c2)
        torch.neg(y, out=out[:, s.c1 :]) if s.neg else out[:, s.c1 :].copy_(y)


def _copy_plain(packed: torch.Tensor, segments: list[Segment]) -> None:
    """The plain copies (`c2 = 0`), any dtypes, in one `_foreach_copy_` (batched launches on CUDA)."""
    if segments:
        views = [packed[s.offset : s.offset + s.nbytes].view(s.x.dtype).view(s.x.shape) for s in segments]
        torch._foreach_copy_(views, [s.x for s in segments])


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
_COLUMNS = 8  # per segment in the kernel's table: first block, out offset, rows, c1, c2, neg, x, y addresses


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def convert_segments(
            out_ptr, table, n_segments, grid, steps, search,
            WORD: tl.constexpr, SIGN: tl.constexpr, BLOCK: tl.constexpr, COLUMNS: tl.constexpr,
        ):  # fmt: skip
            program = tl.program_id(0).to(tl.int64)  # all index arithmetic in int64: offsets pass 2**31
            zero = program * 0
            for step in range(steps):
                b = program + (zero + grid) * step
                # the segment: the last one whose first block is <= b
                lo = zero
                hi = zero + (n_segments - 1)
                for _ in range(search):
                    mid = (lo + hi + 1) // 2
                    ok = tl.load(table + mid * COLUMNS) <= b
                    lo = tl.where(ok, mid, lo)
                    hi = tl.where(ok, hi, mid - 1)
                row_ptr = table + lo * COLUMNS
                first = tl.load(row_ptr)
                out_off = tl.load(row_ptr + 1)
                rows = tl.load(row_ptr + 2)
                c1 = tl.load(row_ptr + 3)
                c2 = tl.load(row_ptr + 4)
                neg = tl.load(row_ptr + 5)
                x = tl.load(row_ptr + 6).to(tl.pointer_type(WORD))
                y = tl.load(row_ptr + 7).to(tl.pointer_type(WORD))
                width = c1 + c2
                idx = (b - first) * BLOCK + tl.arange(0, BLOCK)
                mask = idx < rows * width  # also ends a step past the last block: it lands beyond the last segment
                row = idx // width
                col = idx % width
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


def _fill_triton(
    packed: torch.Tensor, segments: list[Segment], *, block: int = _BLOCK, max_programs: int = MAX_PROGRAMS
) -> None:
    """Conversion segments (`c2 > 0`) of one dtype in one launch."""
    segments = [s for s in segments if s.numel]  # nothing to write, and a zero width the kernel would divide by
    if not segments:
        return
    word_torch, word_tl, sign = _word(segments[0].x.dtype)
    itemsize = segments[0].x.element_size()
    out = packed[: packed.numel() // itemsize * itemsize].view(word_torch)
    xs = [s.x.contiguous() for s in segments]
    ys = [s.y.contiguous() for s in segments]
    launch = launch_geometry([s.numel for s in segments], block, max_programs)
    table = [
        (first, s.offset // itemsize, s.rows, s.c1, s.c2, int(s.neg), x.data_ptr(), y.data_ptr())
        for first, s, x, y in zip(launch.starts[:-1], segments, xs, ys, strict=True)
    ]
    table = torch.tensor(table, dtype=torch.int64).to(packed.device).reshape(-1)
    _kernel()[(launch.grid,)](
        out, table, len(segments), launch.grid, launch.steps, launch.search,
        WORD=word_tl, SIGN=sign, BLOCK=launch.block, COLUMNS=_COLUMNS,
        enable_fp_fusion=False,  # no float arithmetic to fuse; saying so keeps Triton 3.9 from warning
    )  # fmt: skip


def fill_segments(packed: torch.Tensor, segments: list[Segment], *, use_triton: bool | None = None) -> None:
    """Write every segment into `packed` (uint8, on the segments' device)."""
    if not segments:
        return
    if use_triton is None:
        use_triton = triton_available(packed.device)
    if not use_triton:
        for s in segments:
            _fill_torch(packed, s)
        return
    _copy_plain(packed, [s for s in segments if not s.c2])
    groups: dict[torch.dtype, list[Segment]] = {}
    for s in segments:
        if s.c2:
            groups.setdefault(s.x.dtype, []).append(s)
    for dtype, group in groups.items():
        if _word(dtype) is not None:
            _fill_triton(packed, group)
        else:
            for s in group:
                _fill_torch(packed, s)
