"""State-dict entries by walking modules, without calling `state_dict()` (whose FSDP1 hooks would gather
every parameter) — same names and order, canonical."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from shardsave.plan.names import canonical_name

__all__ = ["state_entries"]


def state_entries(root: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """`(canonical name, tensor, is_parameter)` for every parameter and persistent buffer, in
    state-dict order; a tensor reachable under several names is listed under each, as in a state dict."""
    for raw_path, module in root.named_modules(remove_duplicate=False):
        path = canonical_name(raw_path)
        prefix = f"{path}." if path else ""
        for name, param in module._parameters.items():
            if param is not None:
                yield prefix + name, param, True
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield prefix + name, buf, False
