"""The tensors to write, on the host: converted (PiSSA/CorDA/OLoRA) where asked, in one device-to-host copy.

Tensors already on the CPU that need no conversion are used as they are. Everything else is written,
converted where needed, into one packed buffer on its device (`shardsave.tensors.kernels`), which reaches the host
in a single copy.
"""

from __future__ import annotations

import torch

from shardsave.tensors.convert import kind_of, segment
from shardsave.tensors.kernels import fill_segments

__all__ = ["to_host", "pack_to_host"]


def _key_name(key) -> str:
    """The checkpoint key inside a `(adapter, key)` pair, or the key itself."""
    return key[-1] if isinstance(key, tuple) else key


def to_host(tensors: dict, initial: dict[str, torch.Tensor] | None = None) -> dict:
    """The tensors on the host, converted (PiSSA/CorDA/OLoRA) first when `initial` is given.

    Tensors already on the CPU that need no conversion are used as they are. Everything else is written,
    converted where needed, into one packed buffer on its device (one Triton launch per dtype on CUDA, the
    same segments with torch elsewhere), which reaches the host in a single copy. Keys may be any hashable;
    the conversion rule reads the last element of a tuple key.
    """
    name = _key_name
    as_is = {
        k: t for k, t in tensors.items() if t.device.type == "cpu" and (initial is None or kind_of(name(k)) == "keep")
    }
    by_device: dict[torch.device, dict] = {}
    for k, t in tensors.items():
        if k not in as_is:
            by_device.setdefault(t.device, {})[k] = t
    out = dict(as_is)
    for group in by_device.values():
        out.update(pack_to_host(group, initial))
    return {k: out[k] for k in tensors}


def _upload(initial: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The initial tensors that `like` needs, cast to their trained dtype, on its device: one copy per dtype."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in like.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    device = next(iter(like.values())).device
    result = {}
    for dtype, names in by_dtype.items():
        flat = torch.cat([initial[n].reshape(-1).to(dtype) for n in names]).to(device, non_blocking=True)
        start = 0
        for n in names:
            size = initial[n].numel()
            result[n] = flat[start : start + size].view(initial[n].shape)
            start += size
    return result


def pack_to_host(tensors: dict, initial: dict[str, torch.Tensor] | None = None) -> dict:
    """Write `tensors` (one device), converted if `initial` is given, into one packed byte buffer on that
    device; copy it to the host once and view it back. A tensor under several names is written once."""
    first: dict[int, object] = {}
    for k, t in tensors.items():
        first.setdefault(id(t), k)
    name = _key_name
    converting = {} if initial is None else {name(k): t for k, t in tensors.items() if kind_of(name(k)) != "keep"}
    on_device = _upload(initial, converting) if converting else {}
    segments, shapes, total = {}, {}, 0
    for ident, k in first.items():
        segments[ident], shapes[ident] = segment(name(k), tensors[k].detach(), on_device.get(name(k)), total)
        total += -(-segments[ident].nbytes // 16) * 16
    device = next(iter(tensors.values())).device
    packed = torch.empty(max(total, 16), dtype=torch.uint8, device=device)
    fill_segments(packed, list(segments.values()))
    host = packed.cpu()
    result = {}
    for k, t in tensors.items():
        s = segments[id(t)]
        result[k] = host[s.offset : s.offset + s.nbytes].view(t.dtype).view(shapes[id(t)])
    return result
