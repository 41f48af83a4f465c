"""Per-rank shard files: every rank writes what it holds, and a manifest written last marks the set complete.

The files are the shard set of `shardsave.formats.shard_set` (its format, names and reader): one
`shard-RRRRR-of-WWWWW.safetensors` per rank, each tensor a 1-D run of elements of the flattened full tensor, and
`manifest.json`, written by rank 0 after every rank reported its file written and fsynced.

Tensors that every rank holds whole (DDP, buffers, unsharded parameters) are written once in total, by
ranks in turn; their copies are compared before the manifest vouches for them (the replica check of
`shardsave.ranks.handshake`). The start is `save_pretrained`'s (`shardsave.save.request.start_save`): the same
plan and agreement, without a gather. Reading needs only these files: `shardsave.merge`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import uuid
from pathlib import Path

import torch

from shardsave.errors import MissingRanksError, SaveError
from shardsave.formats.shard_set import FORMAT, MANIFEST_NAME, SHARD_PATTERN, sha256_of, shard_name
from shardsave.formats.texts import render_texts
from shardsave.log import logger
from shardsave.plan.names import CARD_NAME, CONFIG_NAME, adapter_dir
from shardsave.ranks.handshake import compare_replicas, replicas_to_check
from shardsave.ranks.identity import Ranks, resolve_timeout
from shardsave.ranks.rendezvous import Rendezvous, raise_on_failure, status_of
from shardsave.ranks.replicas import ALL_RANKS, digests, fingerprints
from shardsave.save.request import SaveRequest, start_save
from shardsave.storage.files import make_dirs, remove_file, write_text
from shardsave.storage.local import atomic_file
from shardsave.storage.reads import read_text
from shardsave.storage.stale import remove_stale_in
from shardsave.storage.streaming import TensorSpec, dtype_name, write_streaming
from shardsave.tensors.host import to_host

__all__ = ["FORMAT", "MANIFEST_NAME", "SHARD_PATTERN", "shard_name", "save_shards", "sha256_of"]

RUN_MARKER = (
    ".shardsave-run"  # rank 0 writes the run id here first: a rank that cannot read it is on another filesystem
)


_PART = re.compile(r"^\.(?:shard-\d{5}-of-\d{5}\.safetensors|manifest\.json)\.")


def _remove_stale_parts(directory: Path) -> None:
    """Remove the hidden part-written files (`.<name>.<owner>...`) whose writing rank provably died."""
    remove_stale_in(directory, _PART)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_file(path, lambda tmp: write_text(tmp, text))


def _texts(peft_model, adapter_names: list[str]) -> tuple[str, dict[str, str]]:
    files = render_texts(peft_model, adapter_names, None)
    configs = {name: files[str(adapter_dir(Path(), name) / CONFIG_NAME)].decode() for name in adapter_names}
    return files[CARD_NAME].decode(), configs


def _local_runs(
    request: SaveRequest, ranks: Ranks
) -> tuple[list[dict], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This rank's entries and tensors: its slices of sharded tensors, and its turn of whole ones; and every
    whole (replicated) tensor, by checkpoint key, for the replica check."""
    collector = request.collector
    infos = collector.infos()
    entries, tensors, replicated = [], {}, {}
    turn = 0
    for plan in request.plans:
        for key, source in plan.entries.items():
            primary = collector.primary(source)
            info = infos[primary]
            numel = math.prod(info.shape)
            pieces = collector.slices(primary)
            if pieces is None:  # whole on every rank: written once, by ranks in turn
                replicated[f"{plan.adapter_name}/{key}"] = collector.whole(primary)
                owner, turn = turn % ranks.world_size, turn + 1
                mine = [(0, numel, None)] if owner == ranks.rank else []
            else:
                mine = [(p.start, p.stop, p) for p in pieces if p.rank == ranks.rank and p.stop > p.start]
            for start, stop, piece in mine:
                data = collector.whole(primary).reshape(-1) if piece is None else collector.local(primary, piece)
                name = f"{plan.adapter_name}/{key}@{start}"
                tensors[name] = data.detach()
                entries.append({"tensor": name, "adapter": plan.adapter_name, "key": key, "shape": list(info.shape),
                                "dtype": dtype_name(info.dtype), "start": start, "stop": stop})  # fmt: skip
    return entries, tensors, replicated


def save_shards(
    model,
    shards_directory: str | os.PathLike,
    *,
    selected_adapters=None,
    save_embedding_layers: str | bool = "auto",
    timeout: float | None = None,
    shared_filesystem: bool = True,
) -> Path:
    """Every rank writes the adapter slices it holds to `shards_directory`; merge them with
    `shardsave.merge_shards` or `python -m shardsave.merge`.

    Call it on every rank. No tensor crosses ranks; the ranks only agree at the start and confirm at the
    end, when rank 0 writes `manifest.json`. Returns once the set is complete, or raises on every rank.
    `shared_filesystem=False`: `shards_directory` is a node-local path (the same path on every node, each its
    own disk): each rank clears the old set from its node's folder before any rank writes, rank 0's folder gets
    the manifest; copy the folders back and merge them together (`python -m shardsave.merge DIR1 DIR2 ...`).
    """
    ranks = Ranks.current()
    started = time.perf_counter()
    rdv = Rendezvous(ranks, op="save_shards", timeout=resolve_timeout(timeout))
    request, _ = start_save(
        rdv,
        model,
        shards_directory,
        safe_serialization=True,
        selected_adapters=selected_adapters,
        save_embedding_layers=save_embedding_layers,
        initial=None,
        is_main_process=None,
        gather=False,
    )
    directory = request.destination  # rank 0's resolution of the path: every rank writes there
    names = [p.adapter_name for p in request.plans]
    if not shared_filesystem and ranks.rank != 0:  # its node's folder, cleared before anyone writes
        error = None
        try:
            _clear(directory)
        except Exception as exc:
            error = exc
        rdv.agree("cleared", {}, own=error)
    if ranks.rank == 0:  # before anyone writes: no manifest may vouch for a set being rewritten
        error, card, configs, run_id = None, "", {}, uuid.uuid4().hex
        try:
            # rank 0's texts go into every shard: set-valued config fields serialise in a per-process order
            card, configs = _texts(request.peft_model, names)
            _clear(directory)
            _atomic_write_text(directory / RUN_MARKER, run_id)
        except Exception as exc:
            error = exc
        if not shared_filesystem:
            rdv.agree("cleared", {}, own=error)
        rdv.post("run", status_of(error, run_id=run_id, card=card, configs=configs))
        if error is not None:
            raise error
    else:
        run = rdv.wait_for("run", 0)
        raise_on_failure({0: run}, own=None, ranks=ranks, op="save_shards")
        run_id, card, configs = run["run_id"], run["card"], run["configs"]

    error, report, prints = None, {}, {}
    try:
        if shared_filesystem:
            _check_shared(directory, run_id, ranks.rank)
        entries, tensors, replicated = _local_runs(request, ranks)
        adapters = {p.adapter_name: {"config": configs[p.adapter_name], "keys": list(p.entries)} for p in request.plans}
        metadata = {
            "format": FORMAT, "run_id": run_id, "world_size": str(ranks.world_size), "rank": str(ranks.rank),
            "entries": json.dumps(entries), "adapters": json.dumps(adapters), "card": card,
        }  # fmt: skip
        path = directory / shard_name(ranks.rank, ranks.world_size)
        digest = hashlib.sha256()
        host = to_host(tensors)
        specs = {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in host.items()}
        # byte-identical to save_file, hashed as it is written rather than read back
        atomic_file(path, lambda tmp: write_streaming(tmp, specs, host.__getitem__, metadata=metadata, digest=digest))
        report = {"name": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}
        if ranks.distributed:  # one digest in the store; the fingerprints only if rank 0 asks (they differ)
            prints = {ALL_RANKS: fingerprints(replicated)}
            report["replicas"] = digests(prints)
    except Exception as exc:
        error = exc

    def write_manifest(statuses: dict[int, dict]) -> dict | None:
        """Rank 0, once every rank's file is written: the manifest that vouches for the set, unless the copies of
        the tensors every rank holds whole differ (then: which ranks to ask for their fingerprints)."""
        recheck = replicas_to_check(statuses)
        if recheck:
            return recheck
        files = [{"rank": r, **{k: s[k] for k in ("name", "size", "sha256")}} for r, s in sorted(statuses.items())]
        manifest = {"format": FORMAT, "run_id": run_id, "world_size": ranks.world_size, "files": files}
        try:
            _atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2))
            remove_file(directory / RUN_MARKER)
        except OSError as exc:
            raise SaveError(f"shardsave.save_shards: writing {directory / MANIFEST_NAME} failed: {exc}") from exc

    try:
        recheck = rdv.agree("done", report, own=error, decide=write_manifest)
        if recheck:  # the same check as at the start (`shardsave.ranks.handshake`), with the shard set's message
            compare_replicas(rdv, prints, recheck, written=True)
    except SaveError as exc:
        if ranks.rank == 0:
            remove_file(directory / RUN_MARKER)
            if isinstance(exc, MissingRanksError):
                _remove_stale_parts(directory)  # a rank died mid-write: its part-written file, if provably dead
        raise
    logger.info("wrote %d shard files to %s in %.2f s", ranks.world_size, directory, time.perf_counter() - started)
    return directory


def _clear(directory: Path) -> None:
    """The folder, emptied of a previous set: no manifest may vouch for a set being rewritten."""
    make_dirs(directory, parents=True)
    remove_file(directory / MANIFEST_NAME)
    for stale in directory.iterdir():
        if SHARD_PATTERN.match(stale.name):
            remove_file(stale)  # ranks of one node clear the same folder
    _remove_stale_parts(directory)


def _check_shared(directory: Path, run_id: str, rank: int) -> None:
    """Every rank must see the directory rank 0 prepared: save_shards needs one filesystem shared by all."""
    try:
        seen = read_text(directory / RUN_MARKER)
    except OSError:
        seen = None
    if seen != run_id:
        raise SaveError(
            f"shardsave.save_shards: rank {rank} cannot see the files rank 0 prepared in {directory} "
            f"({RUN_MARKER} {'is missing' if seen is None else 'belongs to another run'}). save_shards needs a "
            f"directory on a filesystem shared by every rank (the same path on every node); use a shared "
            f"filesystem, or shardsave.save_pretrained, which writes on one rank."
        )
