"""The initial PiSSA / CorDA / OLoRA adapter a conversion to plain LoRA reads (`shardsave.tensors.convert`).

The adapter saved right after initialisation, before training: only read (its config is not rewritten and
nothing is loaded into the live model), through the one adapter-folder reader and its pickle gate
(`shardsave.formats.adapter`). `read_checked_initial` is the one check both conversions run (the gathered save's
and the stitcher's): the trained adapter is convertible, and the initial one fits it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from shardsave.formats.adapter import find_weights, read_tensors
from shardsave.tensors.convert import check_convertible, check_initial

__all__ = ["read_initial_adapter", "read_checked_initial"]

_PICKLE_FIX = (
    "Re-save it with safe_serialization=True, or pass allow_pickle=True (merge: --allow-pickle) to load it with "
    "torch.load(weights_only=True)."
)


def read_initial_adapter(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The initial adapter's tensors, read-only: `adapter_model.safetensors`, or - only with `allow_pickle` -
    `adapter_model.bin` through `torch.load(weights_only=True)` (a pickle can run code when loaded)."""
    weights = find_weights(Path(os.fspath(path)))
    if weights is None:
        raise ValueError(
            f"path_initial_model_for_weight_conversion={os.fspath(path)!r}: no adapter_model.safetensors or "
            f"adapter_model.bin there. Pass the directory where the PiSSA/CorDA/OLoRA adapter was saved right after "
            f"initialisation, before training."
        )
    return read_tensors(
        weights, allow_pickle=allow_pickle, fix=_PICKLE_FIX, what="the initial adapter is a pickle", error=ValueError,
        expect="a dict of tensors",
    )  # fmt: skip


def read_checked_initial(
    adapter_name: str,
    config,
    shapes: Mapping[str, tuple[int, ...]],
    path: str | os.PathLike,
    *,
    allow_pickle: bool,
) -> dict[str, torch.Tensor]:
    """The initial adapter at `path`, once adapter `adapter_name` (its `config`: a LoraConfig or its dict) is
    proven convertible and the initial tensors proven to fit the trained `shapes` (key -> shape)."""
    check_convertible(adapter_name, config)
    initial = read_initial_adapter(path, allow_pickle=allow_pickle)
    check_initial(shapes, initial, os.fspath(path))
    return initial
