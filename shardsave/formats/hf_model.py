"""The Hugging Face model folder: the base model's weights files as `from_pretrained` reads them, and the files
`save_pretrained` writes beside merged weights (its shard split, config.json, generation_config.json, index).

A folder holds `config.json` and either `model.safetensors`, `model.safetensors.index.json` and the files it
names, or the same as `pytorch_model.bin[.index.json]` (pickles: read only with `allow_pickle`, through the one
pickle gate of `shardsave.formats.adapter`). Headers only: a tensor is read when asked for (`ModelFiles.read`),
through safetensors' `safe_open` on the local path (or the pickle's memory map). Also the `--dtype` choices
(`DTYPES`) that `merge_into` and the rescue accept, as `from_pretrained(dtype=)` names them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from shardsave.formats.adapter import load_pickle, pickle_gate
from shardsave.plan.names import path_component
from shardsave.storage.files import write_text
from shardsave.storage.reads import read_text
from shardsave.storage.streaming import TensorSpec, dtype_from_name, read_header

__all__ = ["DTYPES", "MODEL_CONFIG", "ModelFiles", "read_model_files", "split_files", "write_model_files"]

#: `--dtype` choices. "auto": for `merge_into`, what `from_pretrained` picks (the config's dtype, else the
#: checkpoint's); for the rescue, the dtype the model trained each tensor in.
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

MODEL_CONFIG = "config.json"
_SAFE_INDEX, _SAFE = "model.safetensors.index.json", "model.safetensors"
_BIN_INDEX, _BIN = "pytorch_model.bin.index.json", "pytorch_model.bin"
_PICKLE_FIX = (
    "Pass --allow-pickle (allow_pickle=True) to read them with torch.load(weights_only=True), or convert the base "
    "to safetensors."
)

Error = type[Exception]


@dataclass
class ModelFiles:
    """The base model's files: where each tensor is, its shape and stored dtype."""

    folder: Path
    files: dict[str, Path]  # key -> file
    specs: dict[str, TensorSpec]
    offsets: dict[str, int]  # safetensors: byte offset of the key's data
    pickled: dict[Path, dict[str, torch.Tensor]]  # .bin files, memory-mapped

    def read(self, key: str) -> torch.Tensor:
        path = self.files[key]
        if path in self.pickled:
            return self.pickled[path][key]
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)


def _weight_names(folder: Path, index_name: str, error: Error) -> tuple[dict, list[str]]:
    """An index's weight map and the files it names, each proven to stay inside `folder`."""
    try:
        weight_map = json.loads(read_text(folder / index_name))["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise error(f"{folder / index_name}: not a weights index ({exc}).") from None
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:  # each joined to the base folder: none may reach outside it
        path_component(name, source=folder / index_name, what="weights file name", error=error,
                       fix="The index is damaged; download or copy the base model again.")  # fmt: skip
    return weight_map, names


def read_model_files(folder: Path, *, allow_pickle: bool, error: Error) -> ModelFiles:
    """The weights files of the model folder `folder`, headers only; `error`: what to raise when it is not one."""
    if not (folder / MODEL_CONFIG).is_file():
        raise error(f"{folder}: no config.json; --into needs a local Hugging Face model folder.")
    for index_name, single, pickled in ((_SAFE_INDEX, _SAFE, False), (_BIN_INDEX, _BIN, True)):
        if (folder / index_name).is_file():
            weight_map, names = _weight_names(folder, index_name, error)
        elif (folder / single).is_file():
            weight_map, names = None, [single]
        else:
            continue
        if pickled:
            pickle_gate(folder / names[0], allow_pickle=allow_pickle, fix=_PICKLE_FIX,
                        what="the base weights are pickles", error=error)  # fmt: skip
        base = ModelFiles(folder, {}, {}, {}, {})
        for name in names:
            path = folder / name
            if not path.is_file():
                raise error(
                    f"{path}: missing, but {folder / index_name} lists it; the base model folder is incomplete "
                    f"(download or copy it again)."
                )
            _read_file(base, path, pickled, allow_pickle, error)
        if weight_map is not None:
            wrong = [k for k, f in weight_map.items() if base.files.get(k, folder / f) != folder / f]
            if wrong:
                raise error(f"{folder / index_name}: {wrong[:3]} are not in the files it names for them.")
        return base
    raise error(f"{folder}: no {_SAFE}, {_SAFE_INDEX}, {_BIN} or {_BIN_INDEX}; not a model folder.")


def _read_file(base: ModelFiles, path: Path, pickled: bool, allow_pickle: bool, error: Error) -> None:
    if pickled:
        tensors = load_pickle(path, allow_pickle=allow_pickle, fix=_PICKLE_FIX, what="the base weights are pickles",
                              error=error, expect=None)  # fmt: skip
        base.pickled[path] = tensors
        stored = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    else:
        try:
            _, header = read_header(path)
        except ValueError as exc:
            raise error(str(exc)) from None
        stored = {}
        for key, (dtype, offset, _, shape) in header.items():
            stored[key] = (dtype_from_name(dtype), shape)
            base.offsets[key] = offset
    for key, (dtype, shape) in stored.items():
        base.files[key] = path
        base.specs[key] = TensorSpec(shape, dtype)


def split_files(specs: dict[str, TensorSpec], max_shard_size: int | str, total_parameters: int):
    """The shard files `save_pretrained` splits `specs` (in save order) into, `{file: [keys]}` (huggingface_hub's
    split), and the index it writes beside them (None when unsharded)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from huggingface_hub.serialization._base import parse_size_to_int

    limit = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    if specs and sum(s.nbytes for s in specs.values()) <= limit:
        # all in one file, as huggingface_hub's greedy split puts them in any order; its size check would import
        # torch.distributed.tensor (for DTensor, 0.5-1 s), which none of these meta tensors is
        return {_SAFE: list(specs)}, None
    split = split_torch_state_dict_into_shards(
        {k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in specs.items()},
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    index = None
    if split.is_sharded:
        index = {"metadata": {"total_parameters": total_parameters, **split.metadata},
                 "weight_map": split.tensor_to_filename}  # fmt: skip
    return dict(split.filename_to_tensors), index


def write_model_files(tmp: Path, config, *, dtype: torch.dtype, architecture: str, generation, index) -> None:
    """config.json (its dtype and architecture as save_pretrained records them), generation_config.json and the
    shards' index, as the merged model's `save_pretrained` writes them. `config` is not changed."""
    config = copy.deepcopy(config)
    config.dtype = str(dtype).split(".")[1]
    config.architectures = [architecture]
    config.save_pretrained(str(tmp))
    if generation is not None:
        generation.save_pretrained(str(tmp))
    if index is not None:
        write_text(tmp / _SAFE_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
