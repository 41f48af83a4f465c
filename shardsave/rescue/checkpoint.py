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

Two paths give the same files (tests/rescue/test_rescue_paths.py and every rescue the tests make compare them
byte for byte):

- planned from metadata alone (`shardsave.rescue.fast`: neither peft nor transformers is imported, the rescue
  costs a fraction of a second above `import torch`): the checkpoint's names are the PeftModel's (they name its
  adapters: not PEFT's saved key format), the base model is a Llama-family decoder (model_type
  llama, mistral, qwen2; untied, unquantised) whose config.json is local or cached, the installed PEFT is of the
  0.21 series, and every adapter is a causal-LM or task-less LoRA written by it (every field present) that
  targets the decoder's Linears only (a list or a regex; DoRA, rsLoRA, rank_pattern / alpha_pattern,
  modules_to_save=["lm_head"] and several adapters included), with bias "none", no layer selection, no
  trainable tokens, an initialisation that needs no base weights, no embedding targeted or resized, and
  config.json's vocabulary the one PEFT's `save_embedding_layers="auto"` check compares with; the checkpoint's
  adapter tensors are exactly the predicted ones, of the predicted shapes; an existing model card has a YAML
  block;
- anything else, and every refusal (a rescue that does not fit falls back first, so its error is the one the
  skeleton path gives), builds PEFT's skeleton and imports peft and transformers: the checkpoint's names alone do
  not say which frozen layers PEFT saves with the adapter (a resized or targeted embedding), which shapes the
  config implies on another base, nor what another PEFT release writes into adapter_config.json and the card
  (`render_texts` renders them with PEFT's own writers, from the model's classes).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from shardsave.checks.verify import callback_adapter, check_tensors, warn_findings
from shardsave.errors import RescueError
from shardsave.formats.adapter_write import CARD_NAME, CONFIG_NAME, write_weights
from shardsave.formats.hf_model import DTYPES
from shardsave.formats.sources import (
    ADAPTER_PART,
    FSDP1_CAUSE,
    FSDP_MODEL_DIR,
    Source,
    detect_source,
    fsdp1_lora_gap,
    key_format,
)
from shardsave.formats.texts import render_texts
from shardsave.log import logger
from shardsave.plan.keys import AdapterPlan, decide_embeddings, plan_choices
from shardsave.plan.names import adapter_dir
from shardsave.plan.structure import build_layout
from shardsave.rescue.fast import plan_without_skeleton
from shardsave.storage.files import remove_scratch, scratch_directory, write_bytes, write_files
from shardsave.storage.local import check_destination, check_overwrite, publish, replace_adapter_files
from shardsave.storage.reads import read_bytes

__all__ = [
    "RescueError",
    "Source",
    "detect_source",
    "align_names",
    "key_format",
    "fsdp1_lora_gap",
    "callback_adapter",
    "rescue_adapter",
]

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
            f"{FSDP1_CAUSE}; "
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
            scratch = scratch_directory("tmp")
            try:
                write_bytes(scratch / CONFIG_NAME, read_bytes(path))
                config = PeftConfig.from_pretrained(str(scratch))
            finally:
                remove_scratch(scratch)
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
            why = f" Nor does it hold the LoRA weights: {FSDP1_CAUSE}. {callback_adapter(source.given)}" if gap else ""
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


def _adapter_names_in(names) -> set[str]:
    """The adapter names the checkpoint's PEFT tensors are stored under (`...lora_A.<name>.weight`)."""
    out = set()
    for n in names:
        m = ADAPTER_PART.search(n)
        if m is not None:
            rest = n[m.end() :]
            out.add(rest.split(".")[0] if rest else n.rsplit(".", 1)[-1])
    return out


# --- the plan ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    plans: list[AdapterPlan]
    sources: dict[str, str]  # model name -> checkpoint name, for every tensor to write
    texts: Callable[[], dict[str, bytes]]  # the card and configs by relative path
    configs: Callable[[], dict[str, dict]]  # adapter name -> its config as PeftConfig.to_dict() gives it


def _skeleton_plan(peft_model, plans: list[AdapterPlan], mapping: dict[str, str], card: Path | None) -> _Plan:
    names = [p.adapter_name for p in plans]
    return _Plan(
        plans,
        mapping,
        lambda: render_texts(peft_model, names, card),
        lambda: {name: peft_model.peft_config[name].to_dict() for name in names},
    )


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
        fast = plan_without_skeleton(checkpoint.tensors, configs, base, fmt)
        if fast is not None:
            return _Plan(fast.plans, fast.sources, lambda: fast.texts, lambda: fast.configs)
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
    return _skeleton_plan(peft_model, plans, mapping, card)


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
        adapter_missing = [n for n in missing if ADAPTER_PART.search(n)]
        if adapter_missing:
            raise RescueError(
                f"{config_files}: does not fit the checkpoint {where}: the config needs {len(adapter_missing)} "
                f"adapter tensor(s) the checkpoint does not have, e.g. {adapter_missing[:3]}; its adapter tensors "
                f"are e.g. {[n for n in checkpoint.tensors if ADAPTER_PART.search(n)][:3]}. Other target_modules or "
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
        if n not in planned and (fmt == "peft" or ADAPTER_PART.search(n) and _adapter_names_in([n]) & ours)
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
        f"{FSDP1_CAUSE}. The LoRA weights "
        f"are not in this checkpoint (resumed with Trainer alone, it restores none of them), so the adapter cannot "
        f"be rescued from it. {callback_adapter(_checkpoint_folder(checkpoint.source))}"
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
    replaced = "its adapter files (nothing else in it is touched)." if in_place else "it."
    check_overwrite(destination, overwrite, RescueError, replaced=replaced)
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
    texts = plan.texts()

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
    configs_written = plan.configs()
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
