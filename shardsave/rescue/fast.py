"""The rescue planned from metadata alone: no PEFT skeleton, so neither peft nor transformers is imported.

`plan_without_skeleton` reads the adapter configs and the base model's config.json as JSON, predicts the plan
the skeleton path would make (`plan.predicted`) and renders adapter_config.json and the model card as PEFT's
writers do (`formats.peft_json`); it returns None, and the caller builds the skeleton as before, for any input
whose files it cannot prove the same. `SHARDSAVE_RESCUE_SKELETON=1` (for the tests that compare both paths)
takes the skeleton path always.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shardsave.compat import peft_rules
from shardsave.formats.peft_json import card_bytes, config_bytes, to_dict
from shardsave.log import logger
from shardsave.plan.keys import AdapterPlan
from shardsave.plan.names import CARD_NAME, CONFIG_NAME, adapter_dir
from shardsave.plan.predicted import FAMILIES, predict_plan
from shardsave.plan.structure import base_config_file
from shardsave.storage.reads import read_bytes, read_text

__all__ = ["SKELETON_SWITCH", "FastPlan", "plan_without_skeleton"]

#: The environment variable that forces the skeleton path (tests compare the two paths' files with it).
SKELETON_SWITCH = "SHARDSAVE_RESCUE_SKELETON"


@dataclass(frozen=True, slots=True)
class FastPlan:
    plans: list[AdapterPlan]
    sources: dict[str, str]  # model name -> checkpoint name
    texts: dict[str, bytes]  # the card and configs by relative path, as render_texts gives them
    configs: dict[str, dict]  # adapter name -> its config as PeftConfig.to_dict() gives it (for check_tensors)


def _json(path: Path | str) -> dict | None:
    try:
        raw = json.loads(read_text(Path(path)))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _vocab_checked_alike(raw: Mapping, vocab: int) -> bool:
    """PEFT's `save_embedding_layers="auto"` check for this config decides "not resized" without a warning:
    no base name, or the base name's config.json (local, or in the cache) has vocabulary `vocab`."""
    model_id = raw.get("base_model_name_or_path")
    if model_id is None or model_id == "":  # "" only from 0.21 on: config_from_json_known implies it
        return True
    found = base_config_file(model_id, revision=raw.get("revision"))
    if found is False:
        return True
    other = _json(found) if isinstance(found, str) else None
    return other is not None and other.get("vocab_size") == vocab


def plan_without_skeleton(
    tensors: Mapping[str, tuple], configs: dict[str, Path], base: str | None, fmt: str | None
) -> FastPlan | None:
    """The rescue's plan and texts for `configs` (adapter name -> config file) on the checkpoint `tensors`
    (canonical name -> (shape, dtype)), or None where only the skeleton path is known to give them (why: logged
    at debug level)."""
    planned = _plan(tensors, configs, base, fmt)
    if isinstance(planned, str):
        logger.debug("the rescue builds PEFT's skeleton: %s", planned)
        return None
    logger.debug("the rescue is planned from metadata alone (no PEFT skeleton)")
    return planned


def _plan(tensors: Mapping[str, tuple], configs: dict[str, Path], base: str | None, fmt: str | None):
    if fmt != "model":
        return "the checkpoint's names are not the PeftModel's"
    if os.environ.get(SKELETON_SWITCH):
        return f"{SKELETON_SWITCH} is set"
    if not peft_rules().config_from_json_known:
        return "the installed PEFT's config writer is not reproduced for its release"
    raws = {name: _json(path) for name, path in configs.items()}
    if any(raw is None for raw in raws.values()):
        return "an adapter config is not a JSON object"
    dicts = {name: to_dict(raw) for name, raw in raws.items()}
    if any(d is None for d in dicts.values()):
        return "an adapter config does not hold exactly the installed PEFT's LoraConfig fields"
    name_or_path = next(iter(raws.values())).get("base_model_name_or_path")
    if base is None and not name_or_path:
        return "no base model named"
    try:
        found = base_config_file(base if base is not None else name_or_path)
    except Exception:
        found = None
    model = _json(found) if isinstance(found, str) else None
    if model is None or not isinstance(model.get("vocab_size"), int):
        return "the base model's config.json is not on this machine, or has no vocab_size"
    alike = all(_vocab_checked_alike(raw, model["vocab_size"]) for raw in raws.values())
    predicted = predict_plan(model, raws, tensors, base_vocab_equal=alike)
    if isinstance(predicted, str):
        return predicted
    texts = _texts(raws, dicts, configs, name_or_path or "", FAMILIES[model["model_type"]])
    if texts is None:
        return "the existing model card has no YAML block"
    return FastPlan(predicted.plans, predicted.sources, texts, dicts)


def _texts(raws, dicts, configs: dict[str, Path], name_or_path: str, model_class: tuple[str, str]) -> dict | None:
    """`formats.texts.render_texts`'s files for the skeleton these configs would build (None: a card that only
    PEFT's writer reproduces)."""
    folder = next(iter(configs.values())).parent
    card = folder / CARD_NAME if "default" in configs and (folder / CARD_NAME).is_file() else None
    causal = next(iter(raws.values())).get("task_type") == "CAUSAL_LM"
    rendered = card_bytes(None if card is None else read_bytes(card), name_or_path=name_or_path, causal_lm=causal)
    if rendered is None:
        return None
    out = {CARD_NAME: rendered}
    for name, config in dicts.items():
        auto = None if config.get("task_type") is not None else {
            "base_model_class": model_class[0], "parent_library": model_class[1]
        }  # fmt: skip
        path = adapter_dir(Path(), name) / CONFIG_NAME
        out[str(path)] = config_bytes(config, base_model_name_or_path=name_or_path or None, auto_mapping=auto)
    return dict(sorted(out.items()))
