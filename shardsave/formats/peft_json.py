"""adapter_config.json and the model card as PEFT's writers make them, from the adapter config's JSON, without peft.

PEFT writes a config read from adapter_config.json (`PeftConfig.from_pretrained`) back through its dataclass:
`LoraConfig(**json)` (its `__post_init__` turns `target_modules` / `exclude_modules` lists into sets, sets
`peft_type`, fills an absent `peft_version`), then `save_pretrained`: `asdict` (less `runtime_config`), sets ->
`list(set)`, `auto_mapping` added for a config with no task type, `json.dumps(indent=2, sort_keys=True)`. The card is
`PeftModel.create_or_update_model_card` (huggingface_hub's `ModelCard` from its default template, or the card
already there). `config_bytes` reproduces the config only for a JSON that holds every field of the installed
PEFT's LoraConfig (so no default is filled in) and whose values the `__post_init__` of the PEFT releases where
`compat.PeftRules.config_from_json_known` holds leaves as they are (checked by `plan.predicted`); the caller
falls back to PEFT's own writers otherwise. Which fields LoraConfig has is read from the installed PEFT's source
(its dataclass annotations), never by importing it.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

from shardsave.compat import installed_peft_version
from shardsave.plan.names import CARD_NAME
from shardsave.storage.files import remove_scratch, scratch_directory, write_bytes
from shardsave.storage.reads import read_bytes

__all__ = ["lora_fields", "to_dict", "config_bytes", "card_bytes"]

_CLASSES = {"config.py": ("PeftConfigMixin", "PeftConfig"), "tuners/lora/config.py": ("LoraConfig",)}


@functools.cache
def lora_fields() -> frozenset[str] | None:
    """The dataclass fields of the installed PEFT's LoraConfig (with its bases'), from its source; None if PEFT is
    not installed or its source does not say."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    fields: set[str] = set()
    for relative, classes in _CLASSES.items():
        try:
            tree = ast.parse((root / relative).read_text())
        except (OSError, SyntaxError):
            return None
        found = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in classes}
        if set(found) != set(classes):
            return None
        for node in found.values():
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if "ClassVar" not in ast.unparse(item.annotation):
                        fields.add(item.target.id)
    return frozenset(fields) if "target_modules" in fields and "peft_version" in fields else None


def to_dict(raw: Mapping) -> dict | None:
    """What `LoraConfig(**raw).to_dict()` gives for a JSON holding every field (None: another JSON)."""
    fields = lora_fields()
    config = {k: v for k, v in raw.items() if k != "runtime_config"}
    # (LoraConfig.to_dict drops runtime_config, from_json_file ignores it)
    if fields is None or set(config) - fields or fields - set(config) - {"peft_version", "runtime_config"}:
        return None
    version = installed_peft_version()
    if config.get("peft_version") is None:
        if "dev" in version:  # PEFT appends the commit of a dev install
            return None
        config["peft_version"] = version
    for name in ("target_modules", "exclude_modules"):
        if isinstance(config.get(name), list):
            config[name] = set(config[name])
    config["peft_type"] = "LORA"
    return config


def config_bytes(config: Mapping, *, base_model_name_or_path: str | None, auto_mapping: dict | None) -> bytes:
    """`formats.adapter_write.write_config`'s file for the `to_dict` result `config`."""
    out = dict(config)
    out["inference_mode"] = True
    if out.get("base_model_name_or_path") is None:
        out["base_model_name_or_path"] = base_model_name_or_path
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = list(value)
    if auto_mapping is not None:
        out["auto_mapping"] = auto_mapping
    return json.dumps(out, indent=2, sort_keys=True).encode()


def card_bytes(existing: bytes | None, *, name_or_path: str, causal_lm: bool, model_tags=()) -> bytes:
    """`create_or_update_model_card`'s README.md for a LoRA PeftModel on a transformers model loaded from
    `name_or_path`, unquantised (`existing`: the card already there)."""
    from huggingface_hub import ModelCard, ModelCardData

    version = installed_peft_version()
    tmp = scratch_directory("shardsave-card-")
    try:
        filename = tmp / CARD_NAME
        if existing is not None:
            write_bytes(filename, existing)
        card = ModelCard.load(filename) if existing is not None else ModelCard.from_template(ModelCardData())
        card.data["library_name"] = "peft"
        tags = set(model_tags) | {"transformers", "lora", f"base_model:adapter:{name_or_path}"}
        card.data["tags"] = sorted(tags)
        if not card.data.pipeline_tag and causal_lm:
            card.data.pipeline_tag = "text-generation"
        card.data["base_model"] = name_or_path
        lines = card.text.splitlines()
        heading = "### Framework versions"
        if f"- PEFT {version}" not in lines:
            if heading in lines:
                lines.insert(lines.index(heading) + 2, f"- PEFT {version}")
            else:
                lines.append(f"{heading}\n\n- PEFT {version}")
        card.text = "\n".join(lines)
        card.save(str(filename))
        return read_bytes(filename)
    finally:
        remove_scratch(tmp)
