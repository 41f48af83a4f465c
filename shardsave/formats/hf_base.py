"""A base model described from its folder alone, without transformers: what `merge --into` needs of the model
class (`describe_plain_base`), for the bases where the files provably say it all.

`merge_into` otherwise builds the base's class on the meta device with transformers (~3 s of imports) for four
things: the keys `save_pretrained` writes, the tied ones, transformers' weight conversions, and config.json /
generation_config.json as it serialises them. For a decoder-only model of a type in
`shardsave.compat.HF_PLAIN_CAUSAL_LM` whose config.json and generation_config.json the installed transformers
wrote itself, the folder holds all four:
- no conversion: transformers 5 has none for these types (checked against it by tests/formats/test_hf_base.py),
  and no key matches its legacy renamings (`HF_LEGACY_RENAMES`);
- keys: transformers 5's `save_pretrained` wrote the weights, so they are the model's keys with the tied head left
  out; they are checked to have the class's layout (the top-level keys, `num_hidden_layers` layers alike);
- tied: the head, when `tie_word_embeddings` (present in every config.json transformers 5 writes);
- the configs: transformers writes `json.dumps(diff, indent=2, sort_keys=True) + "\n"`; a file it wrote is that
  diff, which loading and saving again leaves as it is but for `dtype` and `architectures` (always kept: they
  differ from the defaults). A file in any other form, another version's, or one holding special floats is
  not described.
The order of the keys is not in the files (safetensors sorts): the caller takes this path only for an unsharded
output, whose single file does not depend on it. Anything else returns None, and the caller builds the class.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from shardsave.compat import HF_LEGACY_RENAMES, HF_PLAIN_CAUSAL_LM, HF_TIED_HEAD, transformers_version
from shardsave.formats.hf_model import DTYPES, MODEL_CONFIG, ModelFiles
from shardsave.storage.reads import read_text

__all__ = ["PlainBase", "describe_plain_base", "canonical_json"]

GENERATION_CONFIG = "generation_config.json"
_EMBED, _NORM, _LAYERS = "model.embed_tokens.weight", "model.norm.weight", "model.layers."


@dataclass(frozen=True, slots=True)
class PlainBase:
    """What the merged model's `save_pretrained` writes, known without building it."""

    architecture: str  # the class AutoModelForCausalLM builds
    dtype: torch.dtype  # the merged model's (`from_pretrained(dtype=)`'s choice)
    keys: list[str]  # the weights it writes (tied copies left out), in no particular order
    shapes: dict[str, tuple[int, ...]]  # every weight's shape, tied ones included (its state_dict)
    tied: dict[str, str]  # tied key -> the key it is tied to
    config_text: str  # config.json
    generation_text: str  # generation_config.json


def canonical_json(data: dict) -> str:
    """A config as transformers' `to_json_string` serialises it."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _written_here(text: str, version: str) -> dict | None:
    """The JSON of `text` if the installed transformers (`version`) wrote it as it is, else None."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("transformers_version") != version or "__float__" in text:
        return None
    return data if canonical_json(data) == text else None


def describe_plain_base(files: ModelFiles, dtype: torch.dtype | None) -> PlainBase | None:
    """The merged model of base `files` in `dtype` (None: "auto"), or None where the files alone do not prove
    what transformers would write (then the model class is built)."""
    version = transformers_version()
    generation = files.folder / GENERATION_CONFIG
    if version is None or files.pickled or not generation.is_file():
        return None
    config_text, generation_text = read_text(files.folder / MODEL_CONFIG), read_text(generation)
    config = _written_here(config_text, version)
    if config is None or _written_here(generation_text, version) is None:
        return None
    architecture = HF_PLAIN_CAUSAL_LM.get(config.get("model_type"))
    if architecture is None or config.get("architectures") != [architecture]:
        return None  # another class, or a head the causal LM class lacks (its keys would differ)
    if any(k in config for k in ("auto_map", "quantization_config", "torch_dtype")):
        return None
    tie = config.get("tie_word_embeddings")
    shapes = {k: tuple(s.shape) for k, s in files.specs.items()}
    if not isinstance(tie, bool) or not _has_class_layout(shapes, config, tie):
        return None
    if any(re.search(pattern, key) for key in shapes for pattern in HF_LEGACY_RENAMES):
        return None  # converted on load
    out_dtype = _dtype(config, files, dtype)
    if out_dtype is None:
        return None
    tied = dict([HF_TIED_HEAD]) if tie else {}
    if tie:
        shapes[HF_TIED_HEAD[0]] = shapes[HF_TIED_HEAD[1]]
    config = {**config, "dtype": str(out_dtype).split(".")[1], "architectures": [architecture]}
    keys = [k for k in files.specs if k not in tied]
    return PlainBase(architecture, out_dtype, keys, shapes, tied, canonical_json(config), generation_text)


def _has_class_layout(shapes: dict[str, tuple], config: dict, tie: bool) -> bool:
    """Whether the keys are those of the class's `save_pretrained`: the embedding, final norm and (untied) head at
    the top, and `num_hidden_layers` layers holding the same names and shapes; the embedding `vocab_size` x
    `hidden_size`."""
    layers, per_layer = config.get("num_hidden_layers"), {}
    top = {_EMBED, _NORM} | (set() if tie else {HF_TIED_HEAD[0]})
    if not isinstance(layers, int) or {k for k in shapes if not k.startswith(_LAYERS)} != top:
        return False
    for key, shape in shapes.items():
        if key.startswith(_LAYERS):
            index, _, name = key[len(_LAYERS) :].partition(".")
            per_layer.setdefault(index, set()).add((name, shape))
    if set(per_layer) != {str(i) for i in range(layers)} or len({frozenset(v) for v in per_layer.values()}) > 1:
        return False  # a layer missing, extra, or unlike the others (in names or shapes)
    embedding = (config.get("vocab_size"), config.get("hidden_size"))
    return shapes[_EMBED] == embedding and (tie or shapes[HF_TIED_HEAD[0]] == embedding)


def _dtype(config: dict, files: ModelFiles, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype `from_pretrained(dtype=)` loads in: the one asked for, else the config's, else the checkpoint's
    first floating one (as `merge_into` resolves "auto"); None for a config dtype outside `DTYPES`."""
    if dtype is not None:
        return dtype
    if "dtype" not in config:
        return next((s.dtype for s in files.specs.values() if s.dtype.is_floating_point), torch.float32)
    return DTYPES.get(config["dtype"]) if config["dtype"] != "auto" else None
