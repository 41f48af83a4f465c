"""What `save_pretrained` and `save_shards` plan on every rank before any tensor moves, and their start.

The plan comes from the model's structure alone (the collector, the key choices for each embeddings decision, a
digest of who holds which range), cached while the structure is unchanged (`shardsave.plan.cache`); the writer
alone resolves the destination, decides the embeddings, reads the initial adapter of a PiSSA/CorDA/OLoRA
conversion and prepares its gather. `start_save` runs the handshake every call runs
(`shardsave.ranks.handshake.start`) over it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from shardsave.formats.initial import read_checked_initial
from shardsave.formats.texts import abandon, render_in_background
from shardsave.plan.cache import PlanCache
from shardsave.plan.keys import AdapterPlan, decide_embeddings, plan_choices
from shardsave.plan.names import check_adapter_name
from shardsave.plan.structure import Layout, build_layout, find_peft_model, peel
from shardsave.ranks.collect import (
    Collector,
    TensorInfo,
    check_readable,
    collector_for,
    describe_stage,
    staged_collector,
)
from shardsave.ranks.handshake import WriterRequest, start
from shardsave.ranks.identity import Ranks
from shardsave.ranks.rendezvous import Rendezvous
from shardsave.ranks.replicas import held_prints
from shardsave.storage.local import check_destination, check_path_argument

__all__ = ["SaveRequest", "start_save"]


@dataclass(slots=True)
class SaveRequest(WriterRequest):
    """Everything a save decided before any tensor moved. `choices` holds each adapter's plan for each
    possible embeddings decision; the writer decides (`decided`: its destination and decisions, shared in
    the agreement), so that only the writer reads the base model's config or the initial adapter and
    resolves the destination path."""

    peft_model: object
    collector: Collector
    choices: dict[str, dict[bool, AdapterPlan]]
    safe: bool
    args: dict
    decided: dict | None = None  # set on the main process while planning, on every rank by the agreement
    replicas: dict[str, dict[str, str]] = field(default_factory=dict)  # this rank's replicated runs' fingerprints
    initial: dict[str, torch.Tensor] | None = None  # PiSSA/CorDA/OLoRA initial adapter, by checkpoint key (writer)
    transfer: object | None = None  # the writer's prepared gather
    texts: Future | None = None  # the writer's card and configs, rendering in a thread

    @property
    def destination(self) -> Path:
        return Path(self.decided["destination"])

    @property
    def plans(self) -> tuple[AdapterPlan, ...]:
        embeddings = self.decided["embeddings"]
        return tuple(options[embeddings[name]] for name, options in self.choices.items())

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(s for plan in self.plans for s in plan.sources))

    def view(self) -> dict:
        """This rank's part, for a model whose ranks hold different parts (`shardsave.plan.stages`)."""
        plans = [(adapter, option, plan) for adapter, opts in self.choices.items() for option, plan in opts.items()]
        sources = list(dict.fromkeys(s for _, _, plan in plans for s in plan.sources))
        primary = self.collector.primary
        entries: dict[str, dict] = {}
        for adapter, option, plan in plans:
            entries.setdefault(adapter, {})[_OPTION[option]] = [[k, primary(v)] for k, v in plan.entries.items()]
        return {"tensors": describe_stage(self.collector, sources), "entries": entries}

    def restage(self, union: dict, writer: int, ranks: Ranks) -> None:
        """Follow the plan all ranks' parts make up: gather through it, save every adapter's union of entries."""
        rank = ranks.rank
        self.collector = staged_collector(self.collector, union, ranks)
        self.choices = {
            adapter: {option == "1": AdapterPlan(adapter, dict(map(tuple, pairs))) for option, pairs in opts.items()}
            for adapter, opts in union["entries"].items()
        }
        if self.initial is not None:
            raise ValueError(
                "path_initial_model_for_weight_conversion is not supported for a model whose ranks hold different "
                "parts (pipeline stages): save the adapter without it, then convert it in one process "
                "(shardsave.save_pretrained on the PeftModel loaded from that save, with the conversion)."
            )
        if rank == writer and self.transfer is not None:
            self.transfer = self.collector.prepare_gather(self.sources, rank)

    def abandon(self) -> None:
        abandon(self.texts)


_OPTION = {True: "1", False: "0"}  # the embeddings decision, as a JSON key


def _check_selected(peft_model, selected_adapters: Sequence[str] | None) -> list[str]:
    available = list(peft_model.peft_config.keys())
    if selected_adapters is None:
        selected = available
    else:
        if isinstance(selected_adapters, str):
            raise ValueError(
                f"selected_adapters must be a list of adapter names, got the string {selected_adapters!r}; "
                f"pass [{selected_adapters!r}]."
            )
        selected = list(selected_adapters)
        unknown = [name for name in selected if name not in available]
        if unknown:
            raise ValueError(
                f"You passed an invalid `selected_adapters` argument: {unknown} not found. The model's "
                f"adapters are {available} - got {selected}."
            )
    for name in selected:
        check_adapter_name(name)
        config = peft_model.peft_config[name]
        if getattr(config, "peft_type", None) != "LORA":
            raise ValueError(
                f"Adapter {name!r} is of type {config.peft_type}; shardsave saves LoRA-family adapters "
                f"(LoRA, DoRA, rsLoRA, PiSSA/CorDA/OLoRA-initialised LoRA). Use PeftModel.save_pretrained for "
                f"other PEFT types, or shardsave.gather_state_dict for the raw tensors."
            )
    return selected


def _prepare_save(
    model,
    save_directory,
    *,
    safe_serialization,
    selected_adapters,
    save_embedding_layers,
    initial,
    ranks,
    is_main: bool,
    allow_pickle: bool = False,
    gather: bool = True,
    stage: bool = True,
) -> SaveRequest:
    path = check_path_argument(save_directory)
    if save_embedding_layers not in ("auto", True, False):
        raise ValueError(f"save_embedding_layers must be 'auto', True or False, got {save_embedding_layers!r}.")
    peft_model = find_peft_model(model)
    selected = _check_selected(peft_model, selected_adapters)
    root = peel(model)
    configs = json.dumps([peft_model.peft_config[n].to_dict() for n in selected], sort_keys=True, default=_plain)
    key = (ranks, _group(), id(peft_model), tuple(selected), save_embedding_layers, configs)
    planned = _PLANS.get(root, key, lambda: _plan(root, peft_model, ranks, selected, save_embedding_layers))
    collector, layout, choices = planned.collector, planned.layout, planned.choices
    check_readable(collector, planned.sources, ranks.rank)
    replicas = held_prints(collector, planned.sources, ranks.rank)
    args = {
        "save_directory": path,
        "safe_serialization": bool(safe_serialization),
        "selected_adapters": selected,
        "save_embedding_layers": save_embedding_layers,
        "configs": hashlib.sha256(configs.encode()).hexdigest()[:16],
        "plan": planned.digest,
        "initial": None if initial is None else os.fspath(initial),
    }
    request = SaveRequest(peft_model, collector, choices, bool(safe_serialization), args, replicas=replicas)
    if is_main:  # the writer alone resolves the path, reads the base model's config and the initial adapter
        request.decided = {
            "destination": str(check_destination(save_directory)),
            "embeddings": decide_embeddings(layout, peft_model, selected, save_embedding_layers),
        }
        if initial is not None:
            request.initial = _check_conversion(peft_model, request.plans, collector.infos(), initial, allow_pickle)
        if gather:  # save_shards moves nothing
            request.transfer = collector.prepare_gather(request.sources, ranks.rank)
            # last: the texts render (holding the GIL) while this rank waits for the others and the tensors
            request.texts = render_in_background(peft_model, selected, request.destination, stage=stage)
    return request


@dataclass(frozen=True, slots=True)
class _Planned:
    """What a save plans from the model's structure alone; reused while the structure is unchanged."""

    collector: Collector
    layout: Layout
    choices: dict[str, dict[bool, AdapterPlan]]
    sources: list[str]  # every tensor any choice may save
    digest: str  # of the structure, the keys and who holds which range: equal on every rank or no save


_PLANS: PlanCache[_Planned] = PlanCache()


def _plain(value: object) -> object:
    """JSON for config values: sets (`target_modules`) sorted, since their order differs between processes."""
    return sorted(value, key=str) if isinstance(value, (set, frozenset)) else str(value)


def _group() -> object:
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def _plan(root, peft_model, ranks: Ranks, selected: list[str], save_embedding_layers) -> _Planned:
    collector = collector_for(root, ranks)
    infos = collector.infos()
    layout = build_layout(peft_model)
    choices = plan_choices(layout, peft_model, list(infos), selected, save_embedding_layers)
    sources = list(dict.fromkeys(s for options in choices.values() for plan in options.values() for s in plan.sources))
    structure = [[n, list(i.shape), str(i.dtype), i.requires_grad] for n, i in infos.items()]
    # which rank holds which range of each tensor: every rank must derive the same, or the gather would mix
    holders = {n: [[p.rank, p.start, p.stop] for p in collector.slices(collector.primary(n)) or ()] for n in sources}
    keys = [[[k, v] for k, v in plan.entries.items()] for options in choices.values() for plan in options.values()]
    digest = hashlib.sha256(json.dumps([structure, keys, holders]).encode()).hexdigest()[:16]
    return _Planned(collector, layout, choices, sources, digest)


def _check_conversion(
    peft_model, plans, infos: dict[str, TensorInfo], initial, allow_pickle: bool
) -> dict[str, torch.Tensor]:
    """Read and check the initial adapter for a PiSSA/CorDA/OLoRA conversion (read-only, on every rank)."""
    if len(plans) != 1:
        raise ValueError(
            f"path_initial_model_for_weight_conversion converts one adapter, but {[p.adapter_name for p in plans]} "
            f"are selected; pass selected_adapters=[<the PiSSA/CorDA/OLoRA adapter>]."
        )
    plan = plans[0]
    shapes = {k: infos[src].shape for k, src in plan.entries.items()}
    config = peft_model.peft_config[plan.adapter_name]
    return read_checked_initial(plan.adapter_name, config, shapes, initial, allow_pickle=allow_pickle)


def start_save(rdv: Rendezvous, model, directory, *, is_main_process, **options) -> tuple[SaveRequest, int]:
    """Every rank plans the save (`_prepare_save` options) and all agree on it (`shardsave.ranks.handshake.start`);
    returns the plan (with the writer's decisions) and the writer rank (-1: a single process that is not the main
    process)."""
    ranks = rdv.ranks

    def prepare(is_main: bool) -> SaveRequest:
        return _prepare_save(model, directory, ranks=ranks, is_main=is_main, **options)

    return start(rdv, prepare, is_main_process)
