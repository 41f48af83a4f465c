"""The writer of a PEFT adapter folder: the weights file and `adapter_config.json`, byte for byte as PEFT's
`save_pretrained` writes them (the model card and configs are rendered by `texts`).

Writes into a directory the storage staged (`shardsave.storage.local.publish` and friends); never publishes
itself. The folder's file names are defined with the other names that become paths (`shardsave.plan.names`)
and re-exported here, so the storage can tell which files a new save supersedes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from shardsave.plan.names import BIN_NAME, CARD_NAME, CONFIG_NAME, SAFETENSORS_NAME
from shardsave.storage.files import with_open_mode, write_text
from shardsave.storage.reads import read_text
from shardsave.tensors.convert import convert_config_dict

__all__ = [
    "SAFETENSORS_NAME",
    "BIN_NAME",
    "CONFIG_NAME",
    "CARD_NAME",
    "write_weights",
    "write_config",
    "rewrite_config_file",
]


def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    """Identifies exact aliases (tied weights saved under two names); disjoint views of one buffer differ."""
    if t.numel() == 0:
        return None
    return (str(t.device), t.data_ptr(), t.numel() * t.element_size())


def _for_safetensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with storage of its own (safetensors refuses aliases); values unchanged."""
    seen: set[tuple[str, int]] = set()
    out = {}
    for name, t in tensors.items():
        key = _storage_key(t)
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[name] = t.contiguous()
    return out


def write_weights(directory: Path, tensors: Mapping[str, torch.Tensor], *, safe: bool) -> Path:
    """`adapter_model.safetensors` (with PEFT's `{"format": "pt"}` metadata) or `adapter_model.bin`."""
    if safe:
        path = directory / SAFETENSORS_NAME
        with_open_mode(path, lambda: save_file(_for_safetensors(tensors), str(path), metadata={"format": "pt"}))
    else:
        path = directory / BIN_NAME
        # a view into a larger buffer would drag the whole buffer into the pickle
        own = {
            k: (v.clone() if v.untyped_storage().nbytes() > v.numel() * v.element_size() else v)
            for k, v in tensors.items()
        }
        torch.save(own, str(path))
    return path


def write_config(directory: Path, config, *, base_model_name_or_path: str | None, auto_mapping: dict | None) -> Path:
    """`adapter_config.json` as PEFT writes it, from a copy: the caller's config is never modified (a shallow
    copy is enough: only top-level fields are set, and PEFT serialises through `asdict`, which copies)."""
    config = copy.copy(config)
    config.inference_mode = True
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = base_model_name_or_path
    config.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)
    return directory / CONFIG_NAME


def rewrite_config_file(path: Path) -> None:
    """Apply `convert_config_dict` (a PiSSA/CorDA/OLoRA conversion) to an `adapter_config.json` in PEFT's own
    JSON layout."""
    write_text(path, json.dumps(convert_config_dict(json.loads(read_text(path))), indent=2, sort_keys=True))
