"""Rescue the PEFT adapter from a checkpoint a training framework wrote (DeepSpeed ZeRO, torch DCP), reading only
the adapter's bytes, and write it as `shardsave.save_pretrained` would have written it from the live model.

    python -m shardsave.merge SRC -o OUT [--adapter-config PATH] [--base BASE] [--dtype ...] [--tag TAG]

The adapter file a job shipped can be empty or sliced (a ZeRO-3 / FSDP save that did not gather) while the
framework's own checkpoint beside it holds every weight. The checkpoint's parameter names are the PeftModel's,
so which tensors make the adapter and under which keys follows from the adapter config applied to the base
model's structure, built on the meta device (`shardsave.plan.skeleton`): the same plan `save_pretrained` makes
(`shardsave.plan.keys`). Only those tensors are read (`shardsave.formats.dcp`, `shardsave.formats.deepspeed`); the
base model's weights are never loaded. Everything is checked before anything is written; the output is
published atomically.

Every rescue builds that skeleton, so every rescue imports peft and transformers (the only job of
`python -m shardsave.merge` that does): the checkpoint's names alone do not say which frozen layers PEFT saves
with the adapter (a resized or targeted embedding), which shapes the config implies on the base (the fit
checks), nor what PEFT writes into adapter_config.json and the model card (`render_texts` renders them with
PEFT's own writers, from the model's classes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from shardsave.checks.verify import check_tensors, warn_findings
from shardsave.errors import RescueError
from shardsave.formats.texts import render_texts
from shardsave.log import logger
from shardsave.plan.keys import AdapterPlan, decide_embeddings, plan_choices
from shardsave.plan.structure import build_layout
from shardsave.storage.local import (
    BIN_NAME,
    CARD_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    adapter_dir,
    check_destination,
    publish,
    replace_adapter_files,
    write_files,
    write_weights,
)

__all__ = [
    "RescueError",
    "Source",
    "DTYPES",
    "detect_source",
    "align_names",
    "key_format",
    "fsdp1_lora_gap",
    "callback_adapter",
    "rescue_adapter",
]

#: `--dtype` choices: "auto" writes each tensor in the dtype the model trained it in.
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: The folder accelerate (and so Trainer) writes an FSDP model's DCP checkpoint into (one per model).
FSDP_MODEL_DIR = re.compile(r"pytorch_model_fsdp_(\d+)$")
_CHECKPOINT_DIR = re.compile(r"checkpoint-\d+$")  # what Trainer names its checkpoint folders
#: Parameter-name components that only a PEFT adapter's tensors have.
_ADAPTER_PART = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save|"
    r"trainable_tokens_delta)(\.|$)"
)
#: A key as PEFT saves it (`get_peft_model_state_dict`): the adapter's slot with no adapter name after it.
_PEFT_KEY = re.compile(
    r"\.(lora_A|lora_B)\.(weight|bias)$|\.(lora_embedding_A|lora_embedding_B|lora_magnitude_vector|"
    r"trainable_tokens_delta)$"
)


@dataclass(frozen=True, slots=True)
class Source:
    """What `python -m shardsave.merge` was pointed at, and where its data is."""

    kind: str  # "shards" | "deepspeed" | "dcp" | "fsdp" (accelerate's pytorch_model_fsdp*.bin)
    given: Path  # the path as passed
    path: Path  # the folder holding the data: the shard set, the DeepSpeed tag folder, the DCP folder

    def describe(self) -> str:
        what = {
            "shards": "a shardsave shard set",
            "deepspeed": "a DeepSpeed ZeRO checkpoint",
            "dcp": "a torch.distributed.checkpoint (DCP) folder",
            "fsdp": "accelerate's FSDP model file(s)",
        }[self.kind]
        if self.kind == "fsdp":
            from shardsave.formats.fsdp import fsdp_files

            files = [p.name for p in fsdp_files(self.path)]
            return f"{what} ({files[0]}{f' .. {files[-1]}' if len(files) > 1 else ''})"
        return what if self.path == self.given else f"{what} ({self.path.relative_to(self.given)})"


# --- what the source is -----------------------------------------------------------------------------------------


def _is_deepspeed(folder: Path) -> bool:
    return (folder / "latest").is_file() or any(folder.glob("*_model_states.pt"))


def detect_source(path: str | os.PathLike, *, tag: str | None = None) -> Source:
    """Recognise `path` from its files: a shard set (`manifest.json`), a DCP folder (`.metadata`), a DeepSpeed
    save (`latest`, or a tag folder of `*_model_states.pt`), accelerate's FSDP model files
    (`pytorch_model_fsdp.bin`, `pytorch_model_fsdp_0_rank<N>.bin`), or a Trainer / accelerate `checkpoint-N/`
    holding one of those (never its `adapter_model.*`, which may be the broken file being rescued)."""
    from shardsave.formats.deepspeed import checkpoint_dir
    from shardsave.formats.fsdp import fsdp_files
    from shardsave.save.shards import MANIFEST_NAME, SHARD_PATTERN

    given = Path(os.path.abspath(os.fspath(path)))
    if not given.exists():
        raise RescueError(f"{given}: does not exist.")
    if not given.is_dir():
        raise RescueError(f"{given}: a file; pass the folder that holds the checkpoint.")
    deepspeed = [given] if _is_deepspeed(given) else []
    deepspeed += [p for p in sorted(given.iterdir()) if p.is_dir() and any(p.glob("*_model_states.pt"))]
    if (given / MANIFEST_NAME).is_file() or any(SHARD_PATTERN.match(p.name) for p in given.iterdir()):
        kind, data = "shards", given  # an incomplete set too: the merge says what is missing
    elif (given / ".metadata").is_file():
        kind, data = "dcp", given
    elif deepspeed:
        kind, data = "deepspeed", _deepspeed_dir(given, tag, checkpoint_dir)
    else:
        dcp = sorted(p for p in given.iterdir() if p.is_dir() and (p / ".metadata").is_file())
        fsdp = sorted((p for p in dcp if FSDP_MODEL_DIR.match(p.name)), key=lambda p: int(p.name.rsplit("_", 1)[1]))
        if fsdp or len(dcp) == 1:
            kind, data = "dcp", (fsdp or dcp)[0]
        elif dcp:
            raise RescueError(
                f"{given}: holds several DCP checkpoints ({[p.name for p in dcp]}); pass the one of the model."
            )
        elif fsdp_files(given):
            kind, data = "fsdp", given
        else:
            raise RescueError(_not_a_source(given))
    if tag is not None and kind != "deepspeed":
        raise RescueError(f"{given}: --tag {tag!r} picks a DeepSpeed checkpoint tag, but this is {kind} data.")
    return Source(kind, given, data)


def _deepspeed_dir(given: Path, tag: str | None, checkpoint_dir: Callable) -> Path:
    try:
        return checkpoint_dir(given, tag)
    except ValueError as exc:
        raise RescueError(str(exc)) from None


def _not_a_source(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    checkpoints = [n for n in names if _CHECKPOINT_DIR.match(n)]
    if checkpoints:
        newest = max(checkpoints, key=lambda n: int(n.rsplit("-", 1)[1]))
        return (
            f"{folder}: a training output folder holding {len(checkpoints)} checkpoint folder(s); pass one of them, "
            f"e.g. {folder / newest} (the newest)."
        )
    if CONFIG_NAME in names or SAFETENSORS_NAME in names or BIN_NAME in names:
        return (
            f"{folder}: a PEFT adapter folder, with no framework checkpoint (DeepSpeed, DCP) or shard set to "
            f"rescue it from. Check it with `python -m shardsave.verify {folder}`; to rebuild it, pass the "
            f"checkpoint the training wrote (e.g. checkpoint-N/, holding global_stepN/ or pytorch_model_fsdp_0/)."
        )
    if not names:
        return (
            f"{folder}: empty: no shard set (manifest.json), DeepSpeed checkpoint or DCP folder. A save_shards "
            f"writing here did not finish (its manifest.json is written last): re-run it."
        )
    return (
        f"{folder}: neither a shardsave shard set (manifest.json), a DeepSpeed checkpoint (latest, "
        f"global_stepN/*_model_states.pt) nor a DCP folder (.metadata); it holds {names[:8]}."
    )


# --- the adapter config -----------------------------------------------------------------------------------------


def _configs_in(folder: Path, present: set[str] | None) -> dict[str, Path]:
    """Adapter name -> folder of its adapter_config.json, as PEFT lays adapters out: `default` at the root,
    others in subfolders named after them; a subfolder counts only when the checkpoint holds an adapter of its
    name (a copy of an adapter saved next to the checkpoint is not one of its adapters). `present` None: the
    checkpoint's keys name no adapter (PEFT's key format), every subfolder counts."""
    found = {"default": folder} if (folder / CONFIG_NAME).is_file() else {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if (present is None or p.name in present) and p.is_dir() and (p / CONFIG_NAME).is_file():
                found.setdefault(p.name, p)
    return found


def _find_configs(
    source: Source, adapter_config: str | os.PathLike | None, present: set[str] | None, hint: str = ""
) -> dict[str, Path]:
    if adapter_config is not None:
        given = Path(adapter_config)
        if given.is_file():
            return {"default": given}
        found = _configs_in(given, present)
        if not found:
            raise RescueError(f"--adapter-config {given}: no {CONFIG_NAME} there or in a subfolder.")
        return {name: folder / CONFIG_NAME for name, folder in found.items()}
    searched = list(dict.fromkeys([source.given, source.path, source.path.parent, source.given.parent]))
    for folder in searched:
        found = _configs_in(folder, present)
        if found:
            return {name: folder / CONFIG_NAME for name, folder in found.items()}
    raise RescueError(
        f"{source.given}: no {CONFIG_NAME} found in {[str(p) for p in searched]}; the checkpoint holds the weights "
        f"but not the adapter's configuration. Pass --adapter-config with the config the training used "
        f"({hint or 'Trainer writes it into each checkpoint-N/ folder; '}"
        f"peft_model.peft_config['default'].save_pretrained(dir) writes it)."
    )


def _no_config_hint(checkpoint: _Checkpoint) -> str:
    """Why a framework checkpoint may come without the adapter's config, for the message that asks for it."""
    source = checkpoint.source
    if source.kind != "fsdp" and not FSDP_MODEL_DIR.match(source.path.name):
        return ""
    names = list(checkpoint.tensors)
    hint = (
        "under FSDP's SHARDED_STATE_DICT Trainer writes no adapter file and no config into checkpoint-N/, only "
        "accelerate's FSDP checkpoint; shardsave's ShardSaveCallback writes both; "
    )
    if key_format(names) is None and all(n.startswith("base_model.model.") for n in names):
        hint += (
            f"and this checkpoint holds no LoRA tensor, only {len(names)} in PEFT's key format ({sorted(names)[:3]}): "
            f"{_FSDP1_CAUSE}; "
        )
    return hint


def _load_config(path: Path):
    from peft import PeftConfig

    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"holds {type(raw).__name__}, not a JSON object")
        if path.name == CONFIG_NAME:
            config = PeftConfig.from_pretrained(str(path.parent))
        else:  # a config file under another name: PEFT reads folders only
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(path, Path(tmp) / CONFIG_NAME)
                config = PeftConfig.from_pretrained(tmp)
    except Exception as exc:
        raise RescueError(f"{path}: not an adapter config PEFT can read ({type(exc).__name__}: {exc}).") from None
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type != "LORA":
        raise RescueError(
            f"{path}: an adapter of type {peft_type}; the rescue writes LoRA-family adapters (LoRA, DoRA, "
            f"rsLoRA, PiSSA/CorDA/OLoRA-initialised LoRA)."
        )
    return config


# --- the checkpoint's tensors -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Checkpoint:
    """A framework checkpoint as the rescue needs it: canonical name -> (shape, trained dtype), and a reader."""

    source: Source
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    read: Callable[[list[str]], dict[str, torch.Tensor]]
    excluded: str = ""  # why frozen parameters may be absent (to explain a missing one)


def _open_checkpoint(source: Source, *, tag: str | None, allow_pickle: bool) -> _Checkpoint:
    if source.kind == "dcp":
        from shardsave.formats.dcp import canonical_keys, dcp_tensors, read_tensors

        try:
            entries = dcp_tensors(source.path)
            names = canonical_keys(entries)
        except ValueError as exc:
            raise RescueError(str(exc)) from None
        tensors = {names[k]: (e.shape, e.dtype) for k, e in entries.items()}
        return _Checkpoint(
            source,
            tensors,
            lambda wanted: read_tensors(source.path, wanted, tensors=entries),
            "the checkpoint was saved from an adapter-only state dict",
        )
    if source.kind == "fsdp":
        from shardsave.formats.dcp import canonical_keys
        from shardsave.formats.fsdp import ShardedTensorFileError, open_fsdp_files

        try:
            files = open_fsdp_files(source.path)
            names = canonical_keys(files.tensors)
        except ShardedTensorFileError as exc:
            gap = exc.keys and key_format(exc.keys) is None  # FSDP1 adapter_only: modules_to_save alone
            why = f" Nor does it hold the LoRA weights: {_FSDP1_CAUSE}. {callback_adapter(source.given)}" if gap else ""
            raise RescueError(f"{exc}{why}") from None
        except ValueError as exc:
            raise RescueError(str(exc)) from None
        saved = {name: key for key, name in names.items()}

        def read_files(wanted: list[str]) -> dict[str, torch.Tensor]:
            got = files.read([saved[n] for n in wanted])
            return {n: got[saved[n]] for n in wanted}

        return _Checkpoint(
            source,
            {names[k]: v for k, v in files.tensors.items()},
            read_files,
            "the checkpoint was saved from an adapter-only state dict",
        )
    from shardsave.formats.deepspeed import read_checkpoint, read_frozen, read_tensors

    try:
        checkpoint = read_checkpoint(source.path, allow_pickle=allow_pickle)
    except ValueError as exc:
        raise RescueError(str(exc)) from None

    def read(wanted: list[str]) -> dict[str, torch.Tensor]:
        held = [n for n in wanted if n in checkpoint.tensors]
        out = read_tensors(checkpoint, held)
        out.update(
            read_frozen(checkpoint, [n for n in wanted if n not in checkpoint.tensors], allow_pickle=allow_pickle)
        )
        return out

    tensors = {n: (t.shape, t.dtype) for n, t in {**checkpoint.frozen, **checkpoint.tensors}.items()}
    return _Checkpoint(
        source, tensors, read, "the checkpoint was saved with exclude_frozen_parameters=True" if not checkpoint.frozen
        else ""
    )  # fmt: skip


def align_names(needed: list[str], available: Mapping[str, object]) -> dict[str, str]:
    """Model name -> checkpoint name. The names agree when the checkpoint was saved from the PeftModel (DeepSpeed
    engine, `get_model_state_dict`, accelerate). Saved from the model inside it, they lack a leading
    `base_model.model.`; saved from a model holding it (TRL's value-head model: `pretrained_model.`), they have
    one more. The one prefix change (drop, add) under which the most names are found is taken, ties to the
    shortest: a pure function of the names."""
    by_tail: dict[str, list[str]] = {}
    for a in available:
        by_tail.setdefault(".".join(a.split(".")[-2:]), []).append(a)
    votes: Counter[tuple[str, str]] = Counter()
    for n in needed:
        for a in by_tail.get(".".join(n.split(".")[-2:]), ()):
            if a == n:
                votes["", ""] += 1
            elif a.endswith("." + n):
                votes["", a[: -len(n)]] += 1
            elif n.endswith("." + a):
                votes[n[: -len(a)], ""] += 1
    if not votes:
        return {}
    drop, add = max(votes, key=lambda r: (votes[r], -len(r[0]) - len(r[1])))
    mapped = {n: add + n[len(drop) :] for n in needed if n.startswith(drop)}
    return {n: a for n, a in mapped.items() if a in available}


def key_format(names: Iterable[str]) -> str | None:
    """How a checkpoint names its adapter tensors (a pure function of the names): "model" (the PeftModel's
    parameter names, `...lora_A.<adapter>.weight`: DeepSpeed, DCP of the model's state dict, accelerate's FSDP2
    FULL_STATE_DICT), "peft" (PEFT's saved keys, `...lora_A.weight`, no adapter name, one adapter: what
    accelerate's `save_fsdp_model(..., adapter_only=True)` writes under SHARDED_STATE_DICT), or None when no name
    shows a LoRA slot (a full fine-tune, or PEFT-format `modules_to_save` tensors alone)."""
    model = peft = False
    for n in names:
        if _PEFT_KEY.search(n):
            peft = True
        elif _ADAPTER_PART.search(n):
            model = True
    return "model" if model else "peft" if peft else None


def _adapter_names_in(names) -> set[str]:
    """The adapter names the checkpoint's PEFT tensors are stored under (`...lora_A.<name>.weight`)."""
    out = set()
    for n in names:
        m = _ADAPTER_PART.search(n)
        if m is not None:
            rest = n[m.end() :]
            out.add(rest.split(".")[0] if rest else n.rsplit(".", 1)[-1])
    return out


# --- the plan ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    peft_model: object
    plans: list[AdapterPlan]
    sources: dict[str, str]  # model name -> checkpoint name, for every tensor to write
    card: Path | None


def _skeleton(base_cfg, configs: dict, name_or_path: str | None, where: str):
    from shardsave.plan.skeleton import SkeletonError, peft_skeleton

    try:
        return peft_skeleton(base_cfg, configs, name_or_path=name_or_path, where=where)
    except SkeletonError as exc:
        raise RescueError(str(exc)) from None


def _resized(peft_model, checkpoint: _Checkpoint, mapping: Mapping[str, str]) -> int | None:
    """The vocabulary size the checkpoint's input embedding has, when it differs from the base config's (the
    model was resized during fine-tuning); None when equal or not in the checkpoint."""
    from shardsave.ranks.collect.walk import state_entries

    embedding = peft_model.get_input_embeddings()
    weight = getattr(getattr(embedding, "base_layer", embedding), "weight", None)
    for name, tensor, _ in state_entries(peft_model):
        if tensor is weight:
            found = checkpoint.tensors.get(mapping.get(name, name))
            if found is not None and found[0] and found[0][0] != weight.shape[0]:
                return int(found[0][0])
            return None
    return None


def _plan_for(checkpoint: _Checkpoint, configs: dict[str, Path], base: str | None, fmt: str | None) -> _Plan:
    """The plan for the checkpoint's adapters. PEFT's key format names no adapter: the checkpoint holds one
    (accelerate saves the active one), taken to be the root config's (`default`) if that fits, else the first
    adapter folder whose config fits; which one is logged."""
    if fmt == "model":
        return _plan(checkpoint, configs, base, fmt)
    errors = []
    for name, path in sorted(configs.items(), key=lambda item: item[0] != "default"):
        try:
            plan = _plan(checkpoint, {name: path}, base, fmt)
        except RescueError as exc:
            errors.append(exc)
            continue
        logger.info(
            "%s names no adapter (PEFT's key format: accelerate's adapter_only save of the active adapter); "
            "rescued as adapter %r, whose config (%s) fits it", checkpoint.source.path, name, path,
        )  # fmt: skip
        return plan
    raise errors[0]


def _plan(checkpoint: _Checkpoint, configs: dict[str, Path], base: str | None, fmt: str | None) -> _Plan:
    from shardsave.plan.skeleton import SkeletonError, base_config
    from shardsave.ranks.collect.walk import state_entries

    peft_configs = {name: _load_config(path) for name, path in configs.items()}
    first = next(iter(peft_configs.values()))
    name_or_path = getattr(first, "base_model_name_or_path", None)
    if base is None and not name_or_path:
        raise RescueError(
            f"{next(iter(configs.values()))}: names no base model (base_model_name_or_path is empty); pass --base "
            f"with the base model's folder (or Hub id, if its config.json is in the local cache)."
        )
    try:
        base_cfg = (
            base_config(base) if base is not None
            else base_config(name_or_path, what=f"{next(iter(configs.values()))}: base_model_name_or_path")
        )  # fmt: skip
    except SkeletonError as exc:
        raise RescueError(f"{exc} (or pass --base)" if base is None else str(exc)) from None
    where = ", ".join(str(p) for p in configs.values())
    peft_model = _skeleton(base_cfg, peft_configs, name_or_path, where)
    shapes = {n: tuple(t.shape) for n, t, _ in state_entries(peft_model)}
    vocab = _resized(peft_model, checkpoint, align_names(list(shapes), checkpoint.tensors))
    if vocab is not None:  # PEFT saves a resized embedding: build the model as it trained
        base_cfg.vocab_size = vocab
        peft_model = _skeleton(base_cfg, peft_configs, name_or_path, where)
        shapes = {n: tuple(t.shape) for n, t, _ in state_entries(peft_model)}
    names = list(shapes)

    layout = build_layout(peft_model)
    selected = list(peft_configs)
    choices = plan_choices(layout, peft_model, names, selected, "auto")
    decided = decide_embeddings(layout, peft_model, selected, "auto")
    plans = [choices[name][decided[name]] for name in selected]
    needed = list(dict.fromkeys(src for plan in plans for src in plan.sources))
    if fmt == "model":
        mapping = align_names(needed, checkpoint.tensors)
    else:  # the checkpoint's names are the adapter file's keys
        saved = align_names([key for plan in plans for key in plan.entries], checkpoint.tensors)
        mapping = {src: saved[key] for plan in plans for key, src in plan.entries.items() if key in saved}
    _check_fit(checkpoint, peft_configs, configs, plans, needed, mapping, shapes, fmt)
    folder = next(iter(configs.values())).parent
    card = folder / CARD_NAME if "default" in configs and (folder / CARD_NAME).is_file() else None
    return _Plan(peft_model, plans, mapping, card)


def _check_fit(checkpoint, peft_configs, configs, plans, needed, mapping, shapes, fmt) -> None:
    """The config describes exactly the adapter the checkpoint holds: every tensor there, of the right shape, and
    no adapter tensor of the checkpoint left out."""
    where = checkpoint.source.path
    present = _adapter_names_in(checkpoint.tensors) if fmt == "model" else set(peft_configs)
    if fmt is None:
        held = set(mapping.values())
        if held == set(checkpoint.tensors):  # the adapter's other tensors alone (or none), in PEFT's format
            raise RescueError(_lora_gap(checkpoint, plans, mapping))
        raise RescueError(
            f"{where}: holds no adapter tensor (no lora_A / lora_B / modules_to_save among its "
            f"{len(checkpoint.tensors)} tensors, e.g. {sorted(checkpoint.tensors)[:3]}): a full fine-tune, or a "
            f"checkpoint of another model. There is no adapter to rescue from it."
        )
    config_files = ", ".join(str(p) for p in configs.values())
    unknown = sorted(present - set(peft_configs))
    if not (present & set(peft_configs)):
        raise RescueError(
            f"{where}: holds adapter(s) {sorted(present)}, but the config(s) found ({config_files}) are for "
            f"{sorted(peft_configs)}. Pass --adapter-config with a folder laid out as PEFT saves those adapters."
        )
    missing = [n for n in needed if n not in mapping]
    if missing:
        adapter_missing = [n for n in missing if _ADAPTER_PART.search(n)]
        if adapter_missing:
            raise RescueError(
                f"{config_files}: does not fit the checkpoint {where}: the config needs {len(adapter_missing)} "
                f"adapter tensor(s) the checkpoint does not have, e.g. {adapter_missing[:3]}; its adapter tensors "
                f"are e.g. {[n for n in checkpoint.tensors if _ADAPTER_PART.search(n)][:3]}. Other target_modules or "
                f"another base model? Pass the config the training used (--adapter-config)."
            )
        why = f" ({checkpoint.excluded})" if checkpoint.excluded else ""
        raise RescueError(
            f"{where}: lacks {missing[:3]}, which the adapter saves (a resized or targeted embedding, or another "
            f"frozen layer PEFT writes with the adapter){why}. Re-save the checkpoint with its frozen parameters, "
            f"or rescue it from a checkpoint that has them."
        )
    for name in needed:
        have, _ = checkpoint.tensors[mapping[name]]
        if tuple(have) != shapes[name]:
            raise RescueError(
                f"{config_files}: does not fit the checkpoint {where}: {mapping[name]} is {list(have)} there, but "
                f"{list(shapes[name])} for this config (r={_r_of(peft_configs, name)}) on this base. Pass the config "
                f"the training used (--adapter-config) and its base model (--base)."
            )
    planned = {mapping[n] for n in needed}
    ours = set(peft_configs)
    extra = sorted(
        n for n in checkpoint.tensors
        if n not in planned and (fmt == "peft" or _ADAPTER_PART.search(n) and _adapter_names_in([n]) & ours)
    )  # fmt: skip
    if extra:
        raise RescueError(
            f"{config_files}: does not fit the checkpoint {where}: the checkpoint holds adapter tensors the config "
            f"does not describe, e.g. {extra[:3]} (other target_modules or layers_to_transform?). Pass the config "
            f"the training used (--adapter-config)."
        )
    if unknown:
        logger.warning(
            "%s also holds adapter(s) %s, for which no config was found; they are not written (pass "
            "--adapter-config with a folder holding their configs in subfolders named after them).", where, unknown
        )  # fmt: skip


_FSDP1_CAUSE = (
    "accelerate's save_fsdp_model(..., adapter_only=True), which Trainer calls for FSDP checkpoints, writes this "
    "under FSDP1: it passes the FSDP1 wrapper to PEFT's get_peft_model_state_dict, which then finds no LoRA "
    "weights (only the modules_to_save ones, if any)"
)


def _checkpoint_folder(source: Source) -> Path:
    """The Trainer `checkpoint-N/` the framework's files are in (`pytorch_model_fsdp_0/` may be passed itself)."""
    return source.given.parent if FSDP_MODEL_DIR.match(source.given.name) else source.given


def _lora_gap(checkpoint: _Checkpoint, plans: list[AdapterPlan], mapping: Mapping[str, str]) -> str:
    keys = [key for plan in plans for key in plan.entries]
    lost = [key for plan in plans for key, src in plan.entries.items() if src not in mapping]
    held = sorted(set(mapping.values()))
    what = f"{len(held)} of the adapter's {len(keys)} tensors, {held[:3]} (in PEFT's key format)," if held else (
        "no tensor at all:"
    )  # fmt: skip
    return (
        f"{checkpoint.source.path}: holds {what} none of its {len(lost)} LoRA tensors (e.g. {lost[:3]}). "
        f"{_FSDP1_CAUSE}. The LoRA weights "
        f"are not in this checkpoint (resumed with Trainer alone, it restores none of them), so the adapter cannot "
        f"be rescued from it. {callback_adapter(_checkpoint_folder(checkpoint.source))}"
    )


def callback_adapter(folder: Path, sound: bool | None = None) -> str:
    """Where in Trainer's `folder` (a checkpoint-N/) the adapter shardsave's ShardSaveCallback writes is, and
    what to do with it; `sound`: what verify found in the folder's own adapter, if known."""
    from shardsave.save.shards import MANIFEST_NAME

    out = []
    weights = next((folder / n for n in (SAFETENSORS_NAME, BIN_NAME) if (folder / n).is_file()), None)
    if weights is not None and (folder / CONFIG_NAME).is_file():
        if sound is None:
            from shardsave.checks.verify import VerifyError, verify_adapter

            try:
                sound = verify_adapter(folder, checkpoint_notes=False).sound
            except VerifyError:
                sound = False
        out.append(
            f"The adapter file {weights} is what shardsave's ShardSaveCallback writes there, if it ran: "
            + ("`python -m shardsave.verify` finds it sound; use it as it is." if sound else
               f"`python -m shardsave.verify {folder}` finds problems in it (not ShardSaveCallback's, then).")
        )  # fmt: skip
    shards = folder / "adapter_shards"
    if (shards / MANIFEST_NAME).is_file():
        out.append(
            f"ShardSaveCallback(shards=True) wrote the adapter's shards to {shards}: write the adapter from them "
            f"with `python -m shardsave.merge {shards} -o OUT`."
        )
    elif not sound:
        out.append(
            f"No adapter ShardSaveCallback wrote is in {folder}: the LoRA weights of this training are lost. Add "
            f"shardsave.integrations.ShardSaveCallback() to the Trainer's callbacks (it writes a correct adapter "
            f"into every checkpoint-N/ and restores it on resume), or train with FSDP2 (fsdp_version: 2)."
        )
    return " ".join(out)


def fsdp1_lora_gap(folder: str | os.PathLike) -> str | None:
    """What accelerate's FSDP1 adapter-only checkpoint in Trainer's `folder` (a checkpoint-N/) lacks, and why;
    None when the folder holds no such checkpoint. From the checkpoint's metadata and names alone (no base
    model needed): such a checkpoint names only PEFT-format `modules_to_save` tensors and no LoRA slot."""
    from shardsave.formats.fsdp import ShardedTensorFileError, open_fsdp_files

    try:
        source = detect_source(folder)
        if source.kind == "fsdp":
            try:
                names = list(open_fsdp_files(source.path).tensors)
            except ShardedTensorFileError as exc:
                names = exc.keys
        elif source.kind == "dcp":
            names = list(_open_checkpoint(source, tag=None, allow_pickle=False).tensors)
        else:
            return None
    except ValueError:
        return None
    if key_format(names) is not None or not all(n.startswith("base_model.model.") for n in names):
        return None
    try:
        targets = json.loads((Path(folder) / CONFIG_NAME).read_text()).get("target_modules")
    except (OSError, ValueError, AttributeError):
        targets = None
    if not targets:
        return None
    what = f"{len(names)} tensor(s), {sorted(names)[:3]} (in PEFT's key format), and" if names else "no tensor:"
    return (
        f"{source.path}: accelerate's FSDP checkpoint of the adapter holds {what} no LoRA tensor of its "
        f"target_modules {targets}. {_FSDP1_CAUSE}. Resumed with "
        f"Trainer alone, this checkpoint restores none of the LoRA weights, and `python -m shardsave.merge` cannot "
        f"rescue the adapter from it."
    )


def _r_of(peft_configs: dict, name: str) -> object:
    for adapter, config in peft_configs.items():
        if f".{adapter}." in name or name.endswith(f".{adapter}"):
            return getattr(config, "r", "?")
    return getattr(next(iter(peft_configs.values())), "r", "?")


# --- entry point ------------------------------------------------------------------------------------------------


def rescue_adapter(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    adapter_config: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    dtype: str = "auto",
    tag: str | None = None,
    safe_serialization: bool = True,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write to `output` the adapter directory `shardsave.save_pretrained` would have written from the model the
    checkpoint `source` (DeepSpeed or DCP; see `detect_source`) was saved from; return its path.

    `adapter_config`: a folder laid out as PEFT saves adapters, or one adapter_config.json (default: found in
    `source` or its parent). `base`: the base model's folder or cached Hub id (default: the config's
    `base_model_name_or_path`). `dtype`: "auto" (what the model trained in: the master weights' cast) or a
    dtype name. Raises `RescueError` (nothing written) for anything that does not fit.
    """
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise RescueError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}.")
    found = detect_source(source, tag=tag)
    if found.kind == "shards":
        raise RescueError(f"{found.given}: a shardsave shard set; merge it with shardsave.merge_shards.")
    destination = check_destination(output)
    # into the checkpoint-N/ folder itself: its adapter files alone are replaced (the broken ones being rescued)
    in_place = destination == found.given and (found.path != found.given or found.kind == "fsdp")
    if destination.exists() and not overwrite:
        raise RescueError(
            f"{destination}: already exists; pass overwrite=True (--overwrite) to replace "
            + ("its adapter files (nothing else in it is touched)." if in_place else "it.")
        )
    if not in_place and (destination == found.path or destination in found.path.parents):
        raise RescueError(
            f"{destination}: would replace the checkpoint {found.path} itself; write the adapter elsewhere."
        )
    checkpoint = _open_checkpoint(found, tag=tag, allow_pickle=allow_pickle)
    fmt = key_format(checkpoint.tensors)
    present = _adapter_names_in(checkpoint.tensors) if fmt == "model" else None
    configs = _find_configs(found, adapter_config, present, _no_config_hint(checkpoint))
    plan = _plan_for(checkpoint, configs, None if base is None else os.fspath(base), fmt)
    try:
        tensors = checkpoint.read(list(dict.fromkeys(plan.sources[n] for p in plan.plans for n in p.sources)))
    except ValueError as exc:
        raise RescueError(str(exc)) from None
    cast = DTYPES[dtype]
    texts = render_texts(plan.peft_model, [p.adapter_name for p in plan.plans], plan.card)

    def value(name: str) -> torch.Tensor:
        tensor = tensors[plan.sources[name]]
        target = cast or checkpoint.tensors[plan.sources[name]][1]
        return tensor.to(target) if tensor.is_floating_point() else tensor

    by_adapter = {p.adapter_name: {key: value(src) for key, src in p.entries.items()} for p in plan.plans}

    def fill(tmp: Path) -> None:
        write_files(tmp, texts)
        for name, adapter in by_adapter.items():
            write_weights(adapter_dir(tmp, name), adapter, safe=safe_serialization)

    if in_place:
        replace_adapter_files(destination, fill)
    else:
        publish(destination, fill)
    # what was rescued gets the checks a save gets: a checkpoint of an untrained or broken run shows here
    configs_written = {p.adapter_name: plan.peft_model.peft_config[p.adapter_name].to_dict() for p in plan.plans}
    warn_findings(
        [f for name, adapter in by_adapter.items() for f in check_tensors(name, configs_written[name], adapter)],
        destination,
    )
    logger.info(
        "rescued %d adapter(s) %s, %d tensors, from %s (%s) into %s in %.2f s", len(plan.plans), list(by_adapter),
        sum(len(a) for a in by_adapter.values()), found.given, found.describe(), destination,
        time.perf_counter() - started,
    )  # fmt: skip
    return destination
