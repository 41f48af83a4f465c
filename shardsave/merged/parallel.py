"""`save_merged`'s parallel write: the writer stages the files (texts, and each safetensors file as its header at
its full, sparse size), every rank checks that it sees them and on which filesystem (`decide_parallel`), writes its
merged runs at their offsets and fsyncs them, then reads its ranges back; the writer publishes only when every
rank's match. Used only on filesystems known to keep several writers' ranges of one file
(`shardsave.storage.filesystems`), unless `parallel_write=True`.
"""

from __future__ import annotations

import math
import os
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from shardsave.errors import SaveError
from shardsave.log import logger
from shardsave.merged.exchange import Exchange, MergedRuns, write_error
from shardsave.merged.planning import MergedPlan, model_files
from shardsave.plan.ranges import Slice
from shardsave.ranks.handshake import await_writer, writer_done
from shardsave.ranks.rendezvous import Rendezvous, raise_on_failure, status_of
from shardsave.storage.files import RangeWriter, preallocate, remove_file, write_text
from shardsave.storage.filesystems import filesystem_type, parallel_safe
from shardsave.storage.local import discard, publish, stage_directory
from shardsave.storage.reads import read_text
from shardsave.storage.streaming import file_layout

__all__ = ["decide_parallel", "stage_files", "write_in_place"]

_RUN_MARKER = ".shardsave-merged-run"  # in the staged folder while the ranks write into it
_READ_CHUNK = 1 << 22  # bytes read back at a time


def decide_parallel(statuses: Mapping[int, Mapping], required: bool | None) -> dict:
    """Rank 0's verdict on a parallel write from every rank's `{"sees": bool, "fs": type}` of the staged folder:
    when every rank sees it, on a filesystem that keeps several writers' ranges of one file
    (`shardsave.storage.filesystems.PARALLEL_SAFE`), or any filesystem if `required`.
    `{"parallel": bool, "why": str}`."""
    blind = sorted(rank for rank, status in statuses.items() if not status["sees"])
    if blind:
        return {"parallel": False, "why": f"rank(s) {blind} do not see the folder the writer staged"}
    unsafe = {rank: status["fs"] for rank, status in sorted(statuses.items()) if not parallel_safe(status["fs"])}
    if unsafe and not required:
        types = sorted(set(map(str, unsafe.values())))
        why = f"rank(s) {sorted(unsafe)} see it on {types}, a filesystem that may keep only the last writer's bytes"
        return {"parallel": False, "why": why}
    return {"parallel": True, "why": "every rank sees the staged folder" + (" (parallel_write=True)" if unsafe else "")}


def _stage(rdv: Rendezvous, merged: MergedPlan, destination: Path, required: bool | None) -> tuple[Path, str] | None:
    """The writer's part of `stage_files`: the staged folder and the run id it marked it with, posted to the others;
    None (posted too) where the filesystem is not known to keep concurrent writes and they are not `required`."""
    fstype = filesystem_type(destination.parent)
    if required is None and not parallel_safe(fstype):
        logger.info("save_merged: %s is on a %s filesystem, which may keep only the last writer's bytes of a "
                    "file: the merged runs stream to the writer (parallel_write=True writes in parallel and "
                    "checks the result)", destination, fstype, extra={"writer": True})  # fmt: skip
        rdv.post("staged", status_of(None, tmp=None))
        return None
    tmp, run, error = None, uuid.uuid4().hex, None
    try:
        tmp = stage_directory(destination)
        model_files(tmp, merged)
        for filename, keys in merged.files.items():
            specs = {k: merged.specs[k] for k in keys}
            head, _ = file_layout(specs, metadata={"format": "pt"})
            preallocate(tmp / filename, head, len(head) + sum(spec.nbytes for spec in specs.values()))
        write_text(tmp / _RUN_MARKER, run)
    except Exception as exc:
        error = exc
    rdv.post("staged", status_of(error, tmp=str(tmp), run=run))
    if error is not None:
        if tmp is not None:
            discard(tmp)
        raise error
    return tmp, run


def stage_files(
    rdv: Rendezvous, merged: MergedPlan, writer: int, destination: Path, required: bool | None
) -> Path | None:
    """The writer stages the folder: texts, and each safetensors file as its header and its full (sparse) size;
    every rank then checks that it sees it, and on which filesystem. Returns the staged folder when a parallel
    write is agreed (each rank writes its runs there), None when not (the runs stream to the writer instead;
    `required` and a rank that does not see it: an error). On a filesystem not known to keep concurrent writes
    the writer stages nothing, unless `required`."""
    ranks = rdv.ranks
    if ranks.rank == writer:
        staged = _stage(rdv, merged, destination, required)
        if staged is None:
            return None
        tmp, run = staged
    else:
        staged = rdv.wait_for("staged", writer)
        raise_on_failure({writer: staged}, own=None, ranks=ranks, op="save_merged")
        if staged["tmp"] is None:
            return None
        tmp, run = Path(staged["tmp"]), staged["run"]
    try:
        sees = read_text(tmp / _RUN_MARKER) == run
    except OSError:
        sees = False
    error = None
    if required and not sees:
        error = SaveError(
            f"shardsave.save_merged(parallel_write=True): rank {ranks.rank} cannot see {tmp}, which the writer "
            f"(rank {writer}) staged; every rank must see one filesystem. Pass parallel_write=None to fall back."
        )
    status = {"sees": sees, "fs": filesystem_type(tmp) if sees else None}
    try:
        verdict = rdv.agree("visible", status, own=error, decide=lambda statuses: decide_parallel(statuses, required))
    except BaseException:
        if ranks.rank == writer:
            discard(tmp)
        raise
    if not verdict["parallel"]:
        if ranks.rank == writer:
            logger.info("save_merged: the merged runs stream to the writer: %s", verdict["why"], extra={"writer": True})
            discard(tmp)
        return None
    return tmp


def _mine(runs: MergedRuns, key: str, world_size: int) -> list[Slice]:
    """The runs of `key` this rank writes: the runs it sends; a tensor every rank holds whole, by one rank picked
    from its name (the work spread over the ranks)."""
    slices = runs.collector.slices(key)
    if slices is None:
        owner = zlib.crc32(key.encode()) % world_size
        return [Slice(owner, 0, math.prod(runs.merged.specs[key].shape))] if owner == runs.rank else []
    return [s for s in slices if s.rank == runs.rank and s.stop > s.start]


@dataclass(frozen=True, slots=True)
class _Written:
    """A byte range this rank wrote into a staged file, and the checksum of what it meant to write there."""

    filename: str
    offset: int
    nbytes: int
    crc: int


def _read_back(tmp: Path, ranges: list[_Written], sizes: Mapping[str, int], rank: int) -> None:
    """Read every range back from the files (opened anew, after every rank closed them) and compare checksums;
    `sizes` (the writer's): each file's full size. Raises `SaveError` naming the first range that differs."""
    by_file: dict[str, list[_Written]] = {}
    for r in ranges:
        by_file.setdefault(r.filename, []).append(r)
    buffer = memoryview(bytearray(_READ_CHUNK))
    for filename in dict.fromkeys([*sizes, *by_file]):
        fd = os.open(tmp / filename, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if filename in sizes and size != sizes[filename]:
                raise _lost(rank, tmp / filename, f"it is {size} bytes long, not {sizes[filename]}")
            for r in by_file.get(filename, ()):
                crc, at, left = 0, r.offset, r.nbytes
                while left:
                    got = os.preadv(fd, [buffer[: min(left, _READ_CHUNK)]], at)
                    if not got:
                        break
                    crc, at, left = zlib.crc32(buffer[:got], crc), at + got, left - got
                if left or crc != r.crc:
                    raise _lost(rank, tmp / filename, f"bytes [{r.offset}, {r.offset + r.nbytes}) this rank wrote "
                                f"read back different")  # fmt: skip
        finally:
            os.close(fd)


def _lost(rank: int, path: Path, what: str) -> SaveError:
    return SaveError(
        f"shardsave.save_merged: the parallel write did not hold on {path} (rank {rank}, filesystem "
        f"{filesystem_type(path)}): {what}, after every rank had written and fsynced it. This filesystem does not "
        f"keep several ranks' writes to one file (an object-store mount keeps the last writer's copy). Nothing was "
        f"published; pass parallel_write=False to stream the tensors to the writer."
    )


def _own_pieces(runs: MergedRuns, key: str, world_size: int) -> list[tuple[int, torch.Tensor]]:
    """(first element, merged values) of every run of `key` this rank writes (`_mine`)."""
    pieces = []
    for piece in _mine(runs, key, world_size):
        if runs.collector.slices(key) is None:
            pieces.append((0, runs.collector.whole(key)))
        else:
            pieces.append((piece.start, runs.collector.local(key, piece)))
    return pieces


def _write_runs(
    merged: MergedPlan,
    runs: MergedRuns,
    order,
    tmp: Path,
    exchange: Exchange,
    layouts: dict,
    rank: int,
    world_size: int,
) -> tuple[list[_Written], Exception | None]:
    """This rank's merged runs, written into the staged files at their offsets and fsynced, in `order`; DoRA tensors
    whose runs cut rows are gathered to the writer and written there (a collective: taken part in even after a
    failure here). Returns what was written and this rank's first error."""
    files = RangeWriter(tmp)
    written: list[_Written] = []
    error = None
    try:
        for filename, key in order:
            if key in merged.whole_on_writer:  # a collective: taken part in even after a failure here
                try:
                    tensor = exchange(key)
                except Exception as exc:
                    error = error or exc
                    break
                pieces = [] if tensor is None else [(0, tensor.reshape(-1))]
            elif error is None:
                pieces = _own_pieces(runs, key, world_size)
            else:
                continue
            error = error or runs.error
            if error is not None:
                continue
            itemsize = merged.specs[key].dtype.itemsize
            try:
                for start, data in pieces:
                    raw = memoryview(data.detach().to("cpu").contiguous().view(torch.uint8).numpy())
                    at = layouts[filename][1][key] + start * itemsize
                    files.write(filename, raw, at)
                    written.append(_Written(filename, at, raw.nbytes, zlib.crc32(raw)))
            except OSError as exc:
                error = write_error(exc, rank, tmp)
        if error is None:
            files.sync()
    except OSError as exc:
        error = write_error(exc, rank, tmp)
    finally:
        files.close()
    return written, error


def write_in_place(
    rdv: Rendezvous,
    merged: MergedPlan,
    runs: MergedRuns,
    order,
    writer: int,
    destination: Path,
    tmp: Path,
    exchange: Exchange,
) -> None:
    """Every rank writes its merged runs into the staged files (`_write_runs`). Once every rank has, each reads its
    ranges back; the writer publishes only if every rank's match."""
    ranks = rdv.ranks
    layouts = {f: file_layout({k: merged.specs[k] for k in keys}, metadata={"format": "pt"})
               for f, keys in merged.files.items()}  # fmt: skip
    written, error = _write_runs(merged, runs, order, tmp, exchange, layouts, ranks.rank, ranks.world_size)
    sizes = {}
    if ranks.rank == writer:  # the headers it staged, and each file's size
        for filename, (head, _) in layouts.items():
            written.append(_Written(filename, 0, len(head), zlib.crc32(head)))
            sizes[filename] = len(head) + sum(merged.specs[k].nbytes for k in merged.files[filename])
    try:
        rdv.agree("written", {}, own=error)
        error = None
        try:
            _read_back(tmp, written, sizes, ranks.rank)
        except Exception as exc:
            error = write_error(exc, ranks.rank, tmp)
        rdv.agree("read-back", {}, own=error)
    except BaseException:
        if ranks.rank == writer:
            discard(tmp)
        raise
    if ranks.rank != writer:
        await_writer(rdv, writer)
        return
    error = None
    with rdv.heartbeat():
        try:
            remove_file(tmp / _RUN_MARKER, missing_ok=False)
            publish(destination, lambda _: None, staged=tmp)
        except Exception as exc:
            error = exc
    writer_done(rdv, error)
