"""adapter_config.json and the model card as PEFT's writers make them, from the adapter config's JSON, without peft.

PEFT writes a config read from adapter_config.json (`PeftConfig.from_pretrained`) back through its dataclass:
`LoraConfig(**json)` (its `__post_init__` turns `target_modules` / `exclude_modules` lists into sets, sets
`peft_type`, fills an absent `peft_version`), then `save_pretrained`: `asdict` (less `runtime_config`), sets ->
`list(set)`, `auto_mapping` added for a config with no task type, `json.dumps(indent=2, sort_keys=True)`. The card is
`PeftModel.create_or_update_model_card` (huggingface_hub's `ModelCard` from its default template, or the card
already there), redone here with huggingface_hub's `ModelCardData`, its template and jinja2 (`_Card`).
`config_bytes` reproduces the config only for a JSON that holds every field of the installed
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
import re
from collections.abc import Mapping
from pathlib import Path

from shardsave.compat import installed_peft_version

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
            # LoraConfig.__post_init__ makes the set, and to_dict's dataclasses.asdict builds it again: where two
            # names share a hash slot, each build may swap them, so the written order follows both builds
            config[name] = set(list(set(config[name])))
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


#: huggingface_hub's pattern of a card's YAML block (the Hub server's; `huggingface_hub.repocard.REGEX_YAML_BLOCK`)
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


def _line_ending(content: str) -> str | None:
    """huggingface_hub's `_detect_line_ending`."""
    cr, lf, crlf = content.count("\r"), content.count("\n"), content.count("\r\n")
    if cr + lf == 0:
        return None
    if crlf == cr and crlf == lf:
        return "\r\n"
    return "\r" if cr > lf else "\n"


class _Card:
    """What PEFT's card writer does with huggingface_hub's `ModelCard` (load or render the default template, set
    data, save), without `huggingface_hub.repocard`, whose import (its Hub API) costs ~0.5 s: the card's YAML
    block parsed into `ModelCardData`, the text kept, written back with the original line endings."""

    def __init__(self, content: str) -> None:
        import yaml
        from huggingface_hub.repocard_data import ModelCardData

        self._content = content
        match = _YAML_BLOCK.search(content)
        if match is None:  # huggingface_hub logs a warning here: PEFT's own writer is used
            raise ValueError("no metadata block")
        self.text = content[match.end() :]
        data = yaml.safe_load(match.group(2)) or {}
        if not isinstance(data, dict):
            raise ValueError("metadata block is not a dict")
        self.data = ModelCardData(**data, ignore_metadata_errors=False)
        self._order = list(data)

    @classmethod
    def from_template(cls) -> _Card:
        import huggingface_hub
        import jinja2
        from huggingface_hub.repocard_data import ModelCardData

        data = ModelCardData()
        template = Path(huggingface_hub.__file__).parent / "templates" / "modelcard_template.md"
        return cls(jinja2.Template(template.read_text(encoding="utf-8")).render(card_data=data.to_yaml(),
                                                                                **data.to_dict()))  # fmt: skip

    def __str__(self) -> str:
        lb = _line_ending(self._content) or "\n"
        return f"---{lb}{self.data.to_yaml(line_break=lb, original_order=self._order)}{lb}---{lb}{self.text}"


def card_bytes(existing: bytes | None, *, name_or_path: str, causal_lm: bool, model_tags=()) -> bytes | None:
    """`create_or_update_model_card`'s README.md for a LoRA PeftModel on a transformers model loaded from
    `name_or_path`, unquantised (`existing`: the card already there); None for a card this writer does not
    reproduce (no YAML block: huggingface_hub warns)."""
    version = installed_peft_version()
    try:
        card = _Card(existing.decode("utf-8-sig")) if existing is not None else _Card.from_template()
    except ValueError:
        return None
    card.data["library_name"] = "peft"
    card.data["tags"] = sorted(set(model_tags) | {"transformers", "lora", f"base_model:adapter:{name_or_path}"})
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
    return str(card).encode("utf-8")
