"""What every rank of `save_merged` plans from metadata alone, before anything moves (`MergedPlan`): the saved
keys and files of the merged model (from a meta-device skeleton, as `save_pretrained` of the merged model gives
them), each key's live source and merge steps (`shardsave.plan.merge_steps`), the LoRA factors the steps use,
and the DoRA tensors that must be merged whole on the writer. The plan is the handshake's request
(`shardsave.ranks.handshake.WriterRequest`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shardsave.compat import hf_saved_keys
from shardsave.formats.hf_model import split_files, write_model_files
from shardsave.plan.keys import plan_choices
from shardsave.plan.merge_steps import PEFT_PREFIX, MergeRefused, Step, plan_merge
from shardsave.plan.skeleton import meta_model
from shardsave.plan.structure import Layout, build_layout, find_peft_model, peel
from shardsave.ranks.collect import Collector, collector_for, describe_stage, staged_collector
from shardsave.ranks.handshake import WriterRequest
from shardsave.ranks.identity import Ranks
from shardsave.ranks.replicas import ALL_RANKS, fingerprints, held_prints
from shardsave.storage.local import check_destination
from shardsave.storage.streaming import TensorSpec, file_order

__all__ = ["MergedPlan", "plan_merged", "split_rows", "write_order", "model_files"]

_WRAPPERS = ("base_layer", "original_module", "token_adapter")  # PEFT's modules around a base module


@dataclass(slots=True)
class MergedPlan(WriterRequest):
    """What every rank knows before anything moves: the files, each tensor's live source and steps."""

    collector: Collector
    specs: dict[str, TensorSpec]  # saved key -> shape and output dtype, in save order
    sources: dict[str, str]  # saved key -> live state-dict name holding the (base or copied) values
    steps: dict[str, list[Step]]
    factors: dict[tuple[str, str], str]  # (adapter, saved adapter key) -> live name, for every factor a step uses
    files: dict[str, list[str]]  # file name -> its keys, in huggingface_hub's split
    index: dict | None  # model.safetensors.index.json, when sharded
    config: object
    generation: object | None
    architecture: str  # the merged model's class, as save_pretrained records it
    args: dict
    whole_on_writer: set[str] = field(default_factory=set)  # DoRA tensors whose runs cut rows: merged by the writer
    decided: dict | None = None  # the writer's, shared in the agreement
    replicas: dict[str, str] = field(default_factory=dict)  # fingerprints of the copies this rank holds, compared

    def view(self) -> dict:
        """This rank's runs of every tensor it will write or read, for layouts whose groups the ranks cannot derive
        alone (each rank holds every module, but only it knows its group): put together as for `save_pretrained`
        (`shardsave.plan.stages`). A pipeline stage never gets here: its keys are refused while planning."""
        names = list(dict.fromkeys([*self.sources.values(), *self.factors.values()]))
        return {"tensors": describe_stage(self.collector, names), "entries": {}}

    def restage(self, union: dict, writer: int, ranks: Ranks) -> None:
        self.collector = staged_collector(self.collector, union, ranks)
        self.whole_on_writer = split_rows(self)

    @property
    def destination(self) -> Path:
        """The writer's resolution of the save's path, which every rank follows (`decided`, after the start)."""
        return Path(self.decided["destination"])


def _merged_name(live: str) -> str:
    """The base model's key for a live state-dict name: PEFT's prefix and wrapper modules removed."""
    parts = live.removeprefix(PEFT_PREFIX).split(".")
    return ".".join(p for p in parts if p not in _WRAPPERS)


def _adapter_state(layout: Layout) -> list[str]:
    """Prefixes of every adapter tensor (LoRA factors, copies, token deltas) of every adapter: not base weights."""
    prefixes = []
    for t in layout.tuners:
        members = set(t.members) | set(t.keyed)
        prefixes += [f"{t.path}.{m}" if t.path else m for m in members]
    return prefixes


def _live_config(config) -> dict:
    """The adapter's config for merging into the live base. A PiSSA / CorDA / OLoRA adapter is merged as it is:
    the live base is the residual base it was initialised against (offline, the saved base is not)."""
    data = config.to_dict()
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "corda", "olora")):
        data["init_lora_weights"] = True
    return data


def _skeleton(hf_model):
    """The base model class on the meta device: its saved keys (tied copies left out, transformers' key conversion
    reverted) and parameter count, as `save_pretrained` of the merged model gives them."""
    skeleton = meta_model(copy.deepcopy(hf_model.config), type(hf_model))
    conversions = getattr(hf_model, "_weight_conversions", None)
    if conversions is not None:
        skeleton._weight_conversions = conversions
    return skeleton, hf_saved_keys(skeleton)


def _selected(peft_model, selected: list[str] | None) -> list[str]:
    """The adapters to merge, in order: those named, else the active adapter (all of them if several are active)."""
    names = list(peft_model.peft_config) if selected is None else list(selected)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown or not names:
        raise ValueError(f"selected_adapters: {unknown or names} not among the model's adapters "
                         f"{list(peft_model.peft_config)}.")  # fmt: skip
    if selected is None and len(names) > 1:
        names = [peft_model.active_adapter] if isinstance(peft_model.active_adapter, str) else names
    return names


def _check_changed(steps: dict[str, list[Step]], skeleton, saved: list[str]) -> None:
    """Every key the adapter changes is one the base model saves untied: else PEFT's merge differs or fails."""
    tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    for key in steps:
        if key in tied:
            raise ValueError(
                f"shardsave.save_merged: the adapter changes {key}, which the base model ties to {tied[key]}; PEFT's "
                f"merge would untie them. Untie the embeddings (tie_word_embeddings=False) before training."
            )
        if key not in saved:
            raise ValueError(
                f"shardsave.save_merged: the adapter changes {key}, which the base model does not have (lora_bias on "
                f"a layer without a bias?); PEFT cannot merge it either."
            )


def _sources(
    saved: list[str], steps: dict[str, list[Step]], entries: dict, live: dict[str, str], hf_model
) -> tuple[dict[str, str], dict[str, list[Step]], dict[tuple[str, str], str]]:
    """Each saved key's live source and remaining steps, and the live name of every factor a step uses."""
    sources, plan, factors = {}, {}, {}
    for key in saved:
        key_steps = list(steps.get(key, []))
        if key_steps and key_steps[0].kind == "replace":  # modules_to_save: the live copy is the value
            step = key_steps.pop(0)
            sources[key] = entries[step.adapter][step.tensors["value"]]
        elif key in live:
            sources[key] = live[key]
        else:
            raise ValueError(
                f"shardsave.save_merged: {type(hf_model).__name__}.save_pretrained writes {key}, which this rank's "
                f"model does not hold under that name: a pipeline stage holding only its own layers (save_merged does "
                f"not put stages together yet), or a model whose save_pretrained converts its weights. Save the "
                f"adapter with shardsave.save_pretrained, then merge it offline: python -m shardsave.merge ADAPTER "
                f"--into BASE -o OUT."
            )
        for step in key_steps:
            for adapter_key in step.tensors.values():
                factors[step.adapter, adapter_key] = entries[step.adapter][adapter_key]
        plan[key] = key_steps
    return sources, plan, factors


def plan_merged(
    model, ranks: Ranks, selected: list[str] | None, dtype, max_shard_size, path: str, is_main: bool
) -> MergedPlan:
    """This rank's `MergedPlan` (the writer's with its destination resolved), from metadata alone."""
    peft_model = find_peft_model(model)
    names = _selected(peft_model, selected)
    collector = collector_for(peel(model), ranks)
    infos = collector.infos()
    layout = build_layout(peft_model)
    choices = plan_choices(layout, peft_model, list(infos), names, False)
    entries = {n: choices[n][False].entries for n in names}
    try:
        steps = plan_merge([(n, _live_config(peft_model.peft_config[n]), list(entries[n])) for n in names])
    except MergeRefused as exc:
        raise ValueError(f"shardsave.save_merged: {exc}") from None
    hf_model = peft_model.get_base_model()
    skeleton, saved = _skeleton(hf_model)
    adapter_state = _adapter_state(layout)
    live: dict[str, str] = {}
    for name in infos:
        if not any(name == p or name.startswith(p + ".") for p in adapter_state):
            live.setdefault(_merged_name(name), name)
    _check_changed(steps, skeleton, saved)
    sources, plan, factors = _sources(saved, steps, entries, live, hf_model)
    specs = {}
    for key in saved:
        info = infos[sources[key]]
        out = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        specs[key] = TensorSpec(tuple(info.shape), out)
    files, index = split_files(specs, max_shard_size, skeleton.num_parameters())
    generation = hf_model.generation_config if hf_model.can_generate() else None
    layout_digest = [[k, sources[k], [[st.adapter, st.kind, dict(st.tensors)] for st in plan[k]],
                      [[p.rank, p.start, p.stop] for p in collector.slices(collector.primary(sources[k])) or ()]]
                     for k in saved]  # fmt: skip
    args = {
        "save_directory": path,
        "selected_adapters": names,
        "dtype": str(dtype),
        "max_shard_size": str(max_shard_size),
        "plan": hashlib.sha256(json.dumps(layout_digest).encode()).hexdigest()[:16],
    }
    merged = MergedPlan(collector, specs, sources, plan, factors, files, index, hf_model.config, generation,
                        type(hf_model).__name__, args)  # fmt: skip
    merged.whole_on_writer = split_rows(merged)
    if ranks.distributed:
        merged.replicas = _copies(collector, [*sources.values(), *factors.values()], ranks)
    if is_main:
        merged.decided = {"destination": str(check_destination(path))}
    return merged


def _copies(collector: Collector, names: list[str], ranks: Ranks) -> dict[str, dict[str, str]]:
    """Fingerprints of what several ranks hold copies of and the merge reads from one of them: replicated runs of
    sharded tensors (HSDP, ZeRO-3 groups), and trainable tensors held whole on every rank (LoRA factors and
    `modules_to_save` copies under DDP or ZeRO-3 persistence, parameters FSDP left unsharded), which a parallel
    write takes from different ranks. Rank 0 refuses copies that drifted apart (`shardsave.ranks.handshake.start`), as
    `save_pretrained` and `save_shards` do. Frozen base weights held whole are left out: nothing trains them.
    By replica group, as `replicas.held_prints` gives them; tensors held whole form the group of every rank
    (`replicas.ALL_RANKS`)."""
    prints = held_prints(collector, names, ranks.rank)
    infos = collector.infos()
    whole = {}
    for name in dict.fromkeys(collector.primary(n) for n in names):
        if collector.slices(name) is None and infos[name].requires_grad:
            whole[f"{name}@0"] = collector.whole(name).detach()
    if whole:
        prints = {**prints, ALL_RANKS: {**prints.get(ALL_RANKS, {}), **fingerprints(whole)}}
    return prints


def split_rows(merged: MergedPlan) -> set[str]:
    """The DoRA tensors some run of which cuts rows (not FSDP2's Shard(0), not held whole): merged by the writer."""
    out = set()
    for key, steps in merged.steps.items():
        slices = merged.collector.slices(merged.collector.primary(merged.sources[key]))
        if slices is None or not any(step.dora for step in steps):
            continue
        shape = merged.specs[key].shape
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        if any(s.start % cols or s.stop % cols for s in slices):
            out.add(key)
    return out


def write_order(merged: MergedPlan) -> list[tuple[str, str]]:
    """(file, key) in the order the writer writes them: every rank takes part in each tensor's gather in it."""
    return [(f, k) for f, keys in merged.files.items() for k in file_order({k: merged.specs[k] for k in keys})]


def model_files(tmp: Path, merged: MergedPlan) -> None:
    first = next((s.dtype for s in merged.specs.values() if s.dtype.is_floating_point), torch.float32)
    write_model_files(tmp, merged.config, dtype=first, architecture=merged.architecture,
                      generation=merged.generation, index=merged.index)  # fmt: skip
