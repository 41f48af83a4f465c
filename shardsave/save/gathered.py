"""`save_pretrained` and `gather_state_dict`: the flow model -> plan -> agree -> collect -> write.

Everything that can fail on one rank alone (bad arguments, an unknown adapter) is decided before any
tensor moves, and all ranks agree on it through `Rendezvous`; only then do collectives run. The writer's
outcome is shared the same way, so a failed write raises on every rank instead of leaving them waiting.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from shardsave.checks.verify import check_tensors, warn_findings
from shardsave.formats.adapter_write import CONFIG_NAME, rewrite_config_file, write_weights
from shardsave.formats.initial import read_checked_initial
from shardsave.formats.texts import Texts, abandon, render_in_background
from shardsave.log import logger
from shardsave.plan.cache import PlanCache
from shardsave.plan.keys import AdapterPlan, decide_embeddings, plan_choices
from shardsave.plan.names import adapter_dir, check_adapter_name
from shardsave.plan.stages import pack_union, union_views, unpack_union
from shardsave.plan.structure import Layout, build_layout, find_peft_model, peel
from shardsave.ranks.collect import (
    Collector,
    TensorInfo,
    TransferError,
    collector_for,
    describe_stage,
    staged_collector,
)
from shardsave.ranks.rendezvous import (
    MissingRanksError,
    Ranks,
    Rendezvous,
    SaveError,
    check_same_args,
    raise_on_failure,
    resolve_timeout,
    status_of,
)
from shardsave.ranks.replicas import digests, diverging, held_prints, members, to_ask
from shardsave.storage.files import write_files
from shardsave.storage.local import check_destination, check_path_argument, publish, replace_adapter_files
from shardsave.storage.stale import remove_stale
from shardsave.tensors.convert import convert_config_dict
from shardsave.tensors.host import to_host

__all__ = ["save_pretrained", "gather_state_dict", "start_save", "agree_start", "run_gather"]


KeepSpec = Callable[[str, TensorInfo], bool] | Iterable[str] | None


@dataclass(slots=True)
class _SaveRequest:
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
) -> _SaveRequest:
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
    _check_readable(collector, planned.sources, ranks.rank)
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
    request = _SaveRequest(peft_model, collector, choices, bool(safe_serialization), args, replicas=replicas)
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


def _check_readable(collector: Collector, names: list[str], rank: int) -> None:
    """Read (as views) this rank's part of every tensor to save, so that a state in which it cannot be read
    (inside FSDP1's `summon_full_params`, ZeRO-3 NVMe offload) fails here, on every rank alike, rather than
    in the middle of the gather."""
    for name in dict.fromkeys(collector.primary(n) for n in names):
        pieces = collector.slices(name)
        if pieces is None:
            collector.whole(name)
        for piece in pieces or ():
            if piece.rank == rank and piece.stop > piece.start:
                collector.local(name, piece)


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


def start_save(rdv: Rendezvous, model, directory, *, is_main_process, **options) -> tuple[_SaveRequest, int]:
    """Every rank plans the save (`_prepare_save` options) and all agree on it; returns the plan (with the
    writer's decisions) and the writer rank (-1: a single process that is not the main process)."""
    ranks = rdv.ranks

    def prepare(is_main: bool) -> _SaveRequest:
        return _prepare_save(model, directory, ranks=ranks, is_main=is_main, **options)

    request, writer, decided = agree_start(rdv, ranks, prepare, is_main_process)
    if request.decided is None:
        request.decided = decided
    return request, writer


def _pick_writer(statuses: dict[int, dict]) -> int:
    writers = [rank for rank, status in sorted(statuses.items()) if status["main"]]
    if len(writers) != 1:
        raise ValueError(
            f"Exactly one rank must write, but is_main_process is true on rank(s) {writers}. Pass "
            f"is_main_process=(rank == 0) (or accelerator.is_main_process), or leave it None for rank 0."
        )
    return writers[0]


def _replicas_to_check(statuses: dict[int, dict]) -> dict | None:
    """Rank 0's comparison of every rank's digest per replica group; where a group's digests differ, which ranks
    to ask for their fingerprints (one per distinct digest) and the group's members (for the message)."""
    by_rank = {rank: status.get("replicas") or {} for rank, status in statuses.items()}
    ask = to_ask(by_rank)
    if not ask:
        return None
    groups = sorted({g for wanted in ask.values() for g in wanted})
    return {"ask": {str(rank): wanted for rank, wanted in ask.items()}, "members": members(by_rank, groups)}


def _recheck_replicas(rdv: Rendezvous, request, recheck: dict) -> None:
    """The second round, only when some replica group's digests differ: the ranks asked post their fingerprints
    of those groups, and rank 0 names the run that differs; raises `ValueError` on every rank."""
    wanted = recheck["ask"].get(str(rdv.ranks.rank), [])
    prints = {group: request.replicas[group] for group in wanted}
    rdv.agree("replicas", {"prints": prints}, decide=lambda statuses: _replicas_differ(statuses, recheck["members"]))


def _replicas_differ(statuses: dict[int, dict], groups: dict[str, list[int]]) -> None:
    by_rank = {rank: {k: v for p in s["prints"].values() for k, v in p.items()} for rank, s in statuses.items()}
    differ = diverging(by_rank)
    if not differ:  # the members hold the same runs by their metadata but report other ones
        keys = {rank: sorted(prints)[:4] for rank, prints in by_rank.items() if prints}
        raise ValueError(
            f"ranks {sorted(keys)} hold copies of the same runs of sharded tensors by their layout, but report "
            f"different runs ({keys}): the ranks' layouts disagree. Save from one model wrapped the same way on "
            f"every rank."
        )
    name, _, start = differ[0].rpartition("@")
    group = next(g for s in statuses.values() for g, prints in s["prints"].items() if differ[0] in prints)
    holders = groups[group]
    raise ValueError(
        f"{len(differ)} run(s) of sharded tensors differ between the ranks that hold copies of them, e.g. "
        f"{name} from element {start} on ranks {holders}: the copies drifted apart during training (e.g. a "
        f"LoRA tensor replicated across tensor-parallel ranks whose gradients are not all-reduced there), so "
        f"any one of them would be a silent choice. Keep replicas in sync (shard such tensors over that "
        f"dimension too), then save."
    )


def _decide_start(statuses: dict[int, dict]) -> dict:
    """Rank 0's verdict on the plans of all ranks: the same arguments, exactly one writer, whose decisions
    everyone follows; the same layout, or else parts of one model (pipeline stages), put together next."""
    args = {rank: {"args": {k: v for k, v in s["args"].items() if k != "plan"}} for rank, s in statuses.items()}
    check_same_args(args, op="save", plan_means="model or adapter layout")
    staged = len({status["args"].get("plan") for status in statuses.values()}) > 1
    recheck = None if staged else _replicas_to_check(statuses)
    writer = _pick_writer(statuses)
    return {"writer": writer, "decided": statuses[writer].get("decided"), "staged": staged, "recheck": recheck}


def agree_start(rdv: Rendezvous, ranks: Ranks, prepare: Callable[[bool], object], main: bool | None):
    """Run `prepare(is_main)` on every rank, agree on the outcome; return (result, writer rank, the writer's
    decisions)."""
    is_main = (ranks.rank == 0) if main is None else bool(main)
    result, error = None, None
    try:
        result = prepare(is_main)
    except Exception as exc:  # shared with the other ranks below, then re-raised
        error = exc
    payload = {"main": is_main, "args": getattr(result, "args", {}), "decided": getattr(result, "decided", None),
               "replicas": digests(getattr(result, "replicas", {}))}  # fmt: skip
    try:
        if not ranks.distributed:
            rdv.agree("start", payload, own=error)
            return result, (ranks.rank if is_main else -1), payload["decided"]
        verdict = rdv.agree("start", payload, own=error, decide=_decide_start)
        if verdict.get("recheck"):
            _recheck_replicas(rdv, result, verdict["recheck"])
    except BaseException:
        abandon(getattr(result, "texts", None))
        raise
    if verdict.get("staged"):
        _restage(rdv, result, verdict["writer"])
    rdv.forget_previous()
    return result, verdict["writer"], verdict["decided"]


def _view_digest(view: dict | None) -> str | None:
    return None if view is None else hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:32]


def _pick_views(statuses: dict[int, dict], seen: dict) -> dict:
    """Rank 0, first round: one rank per distinct view digest is asked for its view (data-parallel replicas of a
    stage hold the same view); `seen` keeps every rank's digest for the second round, on rank 0 only."""
    seen.update({rank: status["view"] for rank, status in statuses.items()})
    first: dict[str, int] = {}
    for rank, digest in sorted(seen.items()):
        first.setdefault(digest, rank)
    return {"ask": sorted(first.values())}


def _union(statuses: dict[int, dict], seen: dict[int, str]) -> dict:
    """Rank 0, second round: the union of every rank's view, each rank's being that of the rank asked for its
    digest (`shardsave.plan.stages.union_views`, which refuses parts that do not add up)."""
    posted = {seen[rank]: status["view"] for rank, status in statuses.items() if "view" in status}
    return pack_union(union_views({rank: posted[digest] for rank, digest in seen.items()}))


def _restage(rdv: Rendezvous, request, writer: int) -> None:
    """The ranks hold different parts of the model (pipeline stages): each reports its part, rank 0 puts them
    together (`shardsave.plan.stages.union_views`, which refuses parts that do not add up), every rank follows that
    plan. Each rank first posts a digest of its part and only one rank per distinct digest the part itself; the
    union, read by every rank, is deleted once all have read it. Following the plan can fail on one rank alone (the
    writer's gather buffers, its initial adapter), so its outcome is agreed too before any tensor moves: else the
    others would send into a gather nobody receives. Costs three more agreements, only for such models."""
    view, error = None, None
    try:
        view = request.view()
    except Exception as exc:
        error = exc
    seen: dict[int, str] = {}  # rank 0: each rank's digest
    try:
        digest = _view_digest(view)
        asked = rdv.agree("stages", {"view": digest}, own=error, decide=lambda s: _pick_views(s, seen))
        mine = {"view": view} if rdv.ranks.rank in asked["ask"] else {}
        union = unpack_union(rdv.agree("views", mine, decide=lambda statuses: _union(statuses, seen)))
        rdv.release("views")
        try:
            request.restage(union, writer, rdv.ranks)
        except Exception as exc:
            error = exc
        rdv.agree("restaged", {}, own=error)
    except BaseException:
        abandon(getattr(request, "texts", None))
        raise
    logger.info("the ranks hold different parts of the model (pipeline stages): saving their union of %d tensors",
                len(union["tensors"]))  # fmt: skip


def _write_adapters(
    request: _SaveRequest,
    tensors: dict[str, torch.Tensor],
    *,
    replace_files_only: bool = False,
    later: Callable[[Callable[[], None]], None] | None = None,
) -> None:
    """Convert if asked, bring to the host in one copy, publish. `tensors`: full tensors by source name."""
    by_key = {(p.adapter_name, key): tensors[src] for p in request.plans for key, src in p.entries.items()}
    host = to_host(by_key, request.initial)

    texts: Texts  # set below, inside the error handling; the writer rendered them while planning
    staged: Path | None = None

    def fill(tmp: Path) -> None:
        if tmp != staged:  # else already written and fsynced there, while the tensors travelled
            write_files(tmp, texts.files)
        for plan in request.plans:
            out = adapter_dir(tmp, plan.adapter_name)
            write_weights(out, {key: host[(plan.adapter_name, key)] for key in plan.entries}, safe=request.safe)
            if request.initial is not None:
                rewrite_config_file(out / CONFIG_NAME)

    try:
        texts = request.texts.result()  # an error while rendering or staging them surfaces here
        staged = None if replace_files_only else texts.staged
        if replace_files_only:
            replace_adapter_files(request.destination, fill)
        else:
            publish(request.destination, fill, staged=staged, **({} if later is None else {"later": later}))
    except OSError as exc:
        raise SaveError(
            f"shardsave.save_pretrained: writing the adapter to {request.destination} failed: {type(exc).__name__}: "
            f"{exc}. Nothing was published: {request.destination} holds what it held before (the previous adapter, "
            f"or nothing). Choose a writable save_directory with free space."
        ) from exc
    _warn_on_written(request, host)


def _warn_on_written(request: _SaveRequest, host: dict) -> None:
    """Run `shardsave.verify`'s checks on the tensors just published and log what they find as one warning.
    After publishing: the adapter is on disk before they run and is never refused by them (an untrained adapter
    may be intended), a failed write reports only its error, and the warning names a folder that exists."""
    findings = []
    try:
        for plan in request.plans:
            config = request.peft_model.peft_config[plan.adapter_name].to_dict()
            if request.initial is not None:  # what was written: the converted config and tensors
                config = convert_config_dict(config)
            pairs = ((key, host[(plan.adapter_name, key)]) for key in plan.entries)
            findings += check_tensors(plan.adapter_name, config, pairs)
    except Exception as exc:  # the checks only advise: the adapter is published already
        logger.warning("checking the adapter written to %s failed (%s: %s); it was written all the same.",
                       request.destination, type(exc).__name__, exc, extra={"writer": True})  # fmt: skip
        return
    warn_findings(findings, request.destination)


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    safe_serialization: bool = True,
    selected_adapters: Sequence[str] | None = None,
    save_embedding_layers: str | bool = "auto",
    is_main_process: bool | None = None,
    path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    timeout: float | None = None,
    replace_files_only: bool = False,
) -> None:
    """Save a PEFT model's adapters exactly as `PeftModel.save_pretrained` would, from any rank layout.

    Call it on every rank. `model` is a `PeftModel` or anything wrapping one (DDP, a DeepSpeed engine,
    FSDP, `torch.compile`). Only the adapter's tensors move, to the main process (`is_main_process`, by
    default rank 0), which publishes the directory atomically. Every rank returns once the adapter is on
    disk, or raises if any rank failed or did not arrive within `timeout` seconds (default: 90% of the process
    group's own timeout, 300 where torch does not expose it). An initial adapter saved as `adapter_model.bin`
    is only read with `allow_pickle=True` (then weights-only).
    `replace_files_only=True` replaces just the adapter's files, each atomically, in an existing directory
    that holds much else (a Trainer checkpoint) instead of republishing the whole directory.
    """
    ranks = Ranks.current()
    started = time.perf_counter()
    rdv = Rendezvous(ranks, op="save_pretrained", timeout=resolve_timeout(timeout))
    request, writer = start_save(
        rdv,
        model,
        save_directory,
        safe_serialization=safe_serialization,
        selected_adapters=selected_adapters,
        save_embedding_layers=save_embedding_layers,
        initial=path_initial_model_for_weight_conversion,
        allow_pickle=allow_pickle,
        is_main_process=is_main_process,
        stage=not replace_files_only,
    )
    if writer < 0:  # one process that is not the main process: PEFT writes nothing either
        return
    if ranks.rank != writer:
        error = run_gather(request.collector.prepare_gather(request.sources, writer), writer, rdv)[1]
        if error is not None:
            raise error
        # the writer may take long (a slow filesystem): waited for while its heartbeat goes on
        try:
            outcome = rdv.wait_for("done", writer, heartbeat=True)
        except MissingRanksError:
            remove_stale(request.destination)  # only what a provably dead writer on this host left
            raise
        raise_on_failure({writer: outcome}, own=None, ranks=ranks, op="save_pretrained")
        return
    cleanup: list[Callable[[], None]] = []  # removing the previous adapter: after the others are released
    with rdv.heartbeat():
        tensors, error = run_gather(request.transfer, writer, rdv)
        if error is None:
            try:
                _write_adapters(request, tensors, replace_files_only=replace_files_only, later=cleanup.append)
            except Exception as exc:
                error = exc
        if error is not None:
            abandon(request.texts)
    if ranks.distributed:
        rdv.post("done", status_of(error))
    for task in cleanup:
        task()
    if error is not None:
        raise error
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    logger.info(
        "saved %d adapter(s), %d tensors, %.2f MiB to %s in %.2f s",
        len(request.plans),
        len(tensors),
        nbytes / 2**20,
        request.destination,
        time.perf_counter() - started,
        extra={"writer": True},
    )


def run_gather(transfer, writer: int, rdv: Rendezvous) -> tuple[dict, SaveError | None]:
    """Run a prepared gather, bounded by the save's timeout. A failed or timed-out exchange becomes a
    `SaveError` saying that a peer probably died or hangs; any other error is this rank's own and is
    reported as such."""
    started = time.perf_counter()
    try:
        return transfer.run(rdv.timeout), None
    except TransferError as exc:
        error = SaveError(
            f"shardsave.{rdv.op}: moving the adapter's tensors to rank {writer} failed on rank {rdv.ranks.rank} "
            f"after {time.perf_counter() - started:.1f} s (timeout={rdv.timeout:g} s): {exc}. Another rank has "
            f"probably died or stopped responding; nothing was written. Check the other ranks' logs."
        )
        cause = exc
    except Exception as exc:
        error = SaveError(
            f"shardsave.{rdv.op}: rank {rdv.ranks.rank} failed while moving the adapter's tensors to rank {writer}: "
            f"{type(exc).__name__}: {exc}. Nothing was written."
        )
        cause = exc
    error.__cause__ = cause
    return {}, error


def _keep_names(keep: KeepSpec, infos: dict[str, TensorInfo]) -> list[str]:
    if keep is None:
        return [n for n, info in infos.items() if info.requires_grad]
    if callable(keep):
        return [n for n, info in infos.items() if keep(n, info)]
    wanted = list(keep)
    unknown = [n for n in wanted if n not in infos]
    if unknown:
        sample = list(infos)[:5]
        raise KeyError(
            f"gather_state_dict: {unknown} are not state-dict names of this model (canonical names, no "
            f"wrapper prefixes, e.g. {sample})."
        )
    return wanted


@dataclass(slots=True)
class _Gather:
    """What `gather_state_dict` decided before anything moved."""

    collector: Collector
    names: list[str]
    args: dict
    transfer: object | None
    replicas: dict[str, dict[str, str]]

    def view(self) -> dict:
        return {"tensors": describe_stage(self.collector, self.names), "entries": {}}

    def restage(self, union: dict, writer: int, ranks: Ranks) -> None:
        self.collector = staged_collector(self.collector, union, ranks)
        self.names = list(union["tensors"])
        if self.transfer is not None:
            self.transfer = self.collector.prepare_gather(self.names, ranks.rank)


def gather_state_dict(
    model: nn.Module,
    *,
    keep: KeepSpec = None,
    is_main_process: bool | None = None,
    timeout: float | None = None,
) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the selected parameters on the main process, `{}` on the others.

    Call it on every rank. `keep` selects state-dict entries: `None` (the default) keeps those that require
    grad, a callable `keep(name, info)` decides per entry, an iterable names them. Names are canonical:
    no `module.`, `_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.` or `_orig_mod.` components.
    """
    ranks = Ranks.current()
    rdv = Rendezvous(ranks, op="gather_state_dict", timeout=resolve_timeout(timeout))

    def prepare(is_main: bool) -> _Gather:
        collector = collector_for(peel(model), ranks)
        names = _keep_names(keep, collector.infos())
        _check_readable(collector, names, ranks.rank)
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
        transfer = collector.prepare_gather(names, ranks.rank) if is_main else None
        return _Gather(collector, names, {"plan": digest}, transfer, held_prints(collector, names, ranks.rank))

    request, writer, _ = agree_start(rdv, ranks, prepare, is_main_process)
    if writer < 0:
        return {}
    transfer = request.transfer if ranks.rank == writer else request.collector.prepare_gather(request.names, writer)
    tensors, error = run_gather(transfer, writer, rdv)
    if error is not None:
        raise error
    # always fresh tensors: what the writer held whole is copied, never handed out as a live alias
    host = to_host(tensors)
    return {k: v.clone() if v is tensors[k] else v for k, v in host.items()}
