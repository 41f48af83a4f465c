"""`save_pretrained` and `gather_state_dict`: the flow model -> plan -> agree -> collect -> write.

Everything that can fail on one rank alone (bad arguments, an unknown adapter) is decided before any
tensor moves, and all ranks agree on it (`shardsave.save.request`, through the handshake every call runs:
`shardsave.ranks.handshake`); only then do collectives run. The writer's outcome is shared the same way, so a
failed write raises on every rank instead of leaving them waiting.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shardsave.checks.verify import check_tensors, warn_findings
from shardsave.errors import SaveError
from shardsave.formats.adapter_write import CONFIG_NAME, rewrite_config_file, write_weights
from shardsave.formats.texts import Texts
from shardsave.log import logger
from shardsave.plan.names import adapter_dir
from shardsave.plan.structure import peel
from shardsave.ranks.collect import (
    Collector,
    TensorInfo,
    check_readable,
    collector_for,
    describe_stage,
    staged_collector,
)
from shardsave.ranks.handshake import WriterRequest, await_writer, run_gather, start, writer_done
from shardsave.ranks.identity import Ranks, resolve_timeout
from shardsave.ranks.rendezvous import Rendezvous
from shardsave.ranks.replicas import held_prints
from shardsave.save.request import SaveRequest, start_save
from shardsave.storage.files import write_files
from shardsave.storage.local import publish, replace_adapter_files
from shardsave.storage.stale import remove_stale
from shardsave.tensors.convert import convert_config_dict
from shardsave.tensors.host import to_host

__all__ = ["save_pretrained", "gather_state_dict", "KeepSpec"]


KeepSpec = Callable[[str, TensorInfo], bool] | Iterable[str] | None


def _write_adapters(
    request: SaveRequest,
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


def _warn_on_written(request: SaveRequest, host: dict) -> None:
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
        # waited for while its heartbeat goes on (a slow filesystem); a provably dead one: what it left here, removed
        await_writer(rdv, writer, on_missing=lambda: remove_stale(request.destination))
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
            request.abandon()
    writer_done(rdv, error, then=cleanup)
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
class _Gather(WriterRequest):
    """What `gather_state_dict` decided before anything moved (it decides nothing for the others: `decided`)."""

    collector: Collector
    names: list[str]
    args: dict
    transfer: object | None
    replicas: dict[str, dict[str, str]]
    decided: dict | None = None

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
        check_readable(collector, names, ranks.rank)
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
        transfer = collector.prepare_gather(names, ranks.rank) if is_main else None
        return _Gather(collector, names, {"plan": digest}, transfer, held_prints(collector, names, ranks.rank))

    request, writer = start(rdv, prepare, is_main_process)
    if writer < 0:
        return {}
    transfer = request.transfer if ranks.rank == writer else request.collector.prepare_gather(request.names, writer)
    tensors, error = run_gather(transfer, writer, rdv)
    if error is not None:
        raise error
    # always fresh tensors: what the writer held whole is copied, never handed out as a live alias
    host = to_host(tensors)
    return {k: v.clone() if v is tensors[k] else v for k, v in host.items()}
