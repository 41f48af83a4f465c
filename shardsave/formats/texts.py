"""The model card and each adapter's `adapter_config.json`, as PEFT writes them.

The writer renders them while the ranks agree and the tensors travel (`render_in_background`), reuses them
while every input PEFT's writers read is unchanged, and can write and fsync them ahead into the hidden
directory the adapter is published from (`Texts.staged`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shardsave.compat import peft_model_tags, peft_rules
from shardsave.formats.adapter_write import CARD_NAME, write_config
from shardsave.plan.names import adapter_dir
from shardsave.storage.files import make_dirs, remove_scratch, scratch_directory, write_bytes, write_files
from shardsave.storage.local import discard, stage_directory
from shardsave.storage.reads import read_bytes

__all__ = ["Texts", "render_text_files", "render_texts", "render_in_background", "abandon"]


def _base_name_or_path(peft_model) -> str | None:
    """The name PEFT writes for a config that has none: null for an empty one from 0.21 on, "" before."""
    name = peft_model.base_model.model.__dict__.get("name_or_path", None)
    return (name or None) if peft_rules().empty_base_name_is_none else name


def _auto_mapping(peft_model, config) -> dict | None:
    if config.task_type is not None:
        return None
    cls = type(peft_model.base_model.model)
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__}


def render_texts(peft_model, adapter_names: Sequence[str], existing_card: Path | None) -> dict[str, bytes]:
    """The card (updating `existing_card`, if given and present, as PEFT does) and the configs, as bytes by
    relative path; reused while every input PEFT's card and config writers read is the same (Trainer saves
    the same adapter config every N steps)."""
    card = read_bytes(existing_card) if existing_card is not None and existing_card.is_file() else None
    key = _texts_key(peft_model, adapter_names, card)
    if key in _TEXTS:
        _TEXTS.move_to_end(key)
        return _TEXTS[key]
    root = scratch_directory("shardsave-texts-")
    try:
        if card is not None:
            write_bytes(root / CARD_NAME, card)
        render_text_files(peft_model, adapter_names, root)
        texts = {str(p.relative_to(root)): read_bytes(p) for p in sorted(root.rglob("*")) if p.is_file()}
    finally:
        remove_scratch(root)
    _TEXTS[key] = texts
    while len(_TEXTS) > 8:
        _TEXTS.popitem(last=False)
    return texts


def _texts_key(peft_model, adapter_names: Sequence[str], card: bytes | None) -> tuple:
    """Everything `create_or_update_model_card` and `write_config` read: the existing card, the adapters'
    configs, the classes, the base model's tags and name, PEFT's version."""
    import peft

    base = peft_model.get_base_model()
    configs = [peft_model.peft_config[n].to_dict() for n in adapter_names]
    return (
        card,
        tuple(adapter_names),
        json.dumps(configs, sort_keys=True, default=str),
        f"{type(peft_model).__module__}.{type(peft_model).__qualname__}",
        f"{type(base).__module__}.{type(base).__qualname__}",
        tuple(sorted(getattr(base, "model_tags", None) or [])),
        peft_model_tags(peft_model),
        getattr(getattr(base, "config", None), "_name_or_path", None),
        _base_name_or_path(peft_model),
        peft.__version__,
    )


_TEXTS: OrderedDict[tuple, dict[str, bytes]] = OrderedDict()


_RENDER: ThreadPoolExecutor | None = None


@dataclass(frozen=True, slots=True)
class Texts:
    files: dict[str, bytes]  # card and configs by relative path
    staged: Path | None  # the hidden directory to publish, already holding them (written and fsynced)


def render_in_background(peft_model, adapter_names: Sequence[str], destination: Path, *, stage: bool) -> Future:
    """Render the card and configs and, with `stage`, write and fsync them into the hidden directory the
    adapter will be published from: done in a thread while the ranks agree and the tensors travel."""
    global _RENDER
    if _RENDER is None:
        _RENDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardsave-render")

    def task() -> Texts:
        files = render_texts(peft_model, list(adapter_names), destination / CARD_NAME)
        if not stage:
            return Texts(files, None)
        staged = stage_directory(destination)
        try:
            write_files(staged, files)
        except BaseException:
            discard(staged)
            raise
        return Texts(files, staged)

    return _RENDER.submit(task)


def abandon(texts: Future | None) -> None:
    """Remove what `render_in_background` staged for a save that will not publish (its hidden directory)."""
    if texts is None:
        return
    try:
        staged = texts.result().staged
    except Exception:
        return
    if staged is not None:
        discard(staged)


def render_text_files(peft_model, adapter_names: Sequence[str], root: Path) -> None:
    """The model card and each adapter's `adapter_config.json`, as PEFT writes them, into `root`."""
    peft_model.create_or_update_model_card(str(root))
    for name in adapter_names:
        out = adapter_dir(root, name)
        make_dirs(out)
        config = peft_model.peft_config[name]
        write_config(
            out,
            config,
            base_model_name_or_path=_base_name_or_path(peft_model),
            auto_mapping=_auto_mapping(peft_model, config),
        )
