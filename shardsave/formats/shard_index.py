"""A shard set opened as one adapter's element runs, and the index that lets other ranks open it unverified.

In a distributed load one rank verifies a shard set (`open_shards`, checksums included: `read_shard_set`) and
describes it in an index (`shard_index`); the others open from that index (`open_indexed`) only the shard files
that hold their ranges, each checked to be the file that rank verified (size and mtime, else its own checksum)
before a byte of it is used (`AdapterFiles.check_on_open`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
import os
import struct
from array import array
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

from shardsave.errors import AdapterFilesError
from shardsave.formats.runs import AdapterFiles, ElementRun
from shardsave.formats.shard_set import FORMAT, MANIFEST_NAME, read_shard_set
from shardsave.storage.reads import read_bytes
from shardsave.storage.streaming import TensorSpec, dtype_from_name, dtype_name

__all__ = ["VerifiedShard", "open_shards", "shard_index", "open_indexed"]


@dataclass(frozen=True, slots=True)
class VerifiedShard:
    """A shard file as the verifying rank checked it: what another rank must find before reading it."""

    rank: int
    size: int
    mtime_ns: int
    sha256: str
    run_id: str
    world_size: int
    adapter: str  # the adapter read (a set may hold several, under the same keys)
    entries: frozenset  # (key, start, stop) of the adapter's runs in this file


def _check_shard(verified: dict[Path, VerifiedShard], f: BinaryIO, path: Path) -> dict[tuple[str, int], int]:
    """The byte offset of each run in an indexed shard file, once it is proven to be the file the verifying rank
    checked: the same size and mtime, or else the manifest's checksum; and a header listing exactly the runs the
    index gives this file."""
    expected, fd = verified[path], f.fileno()
    stat = os.fstat(fd)
    if stat.st_size != expected.size:
        raise AdapterFilesError(
            f"{path}: {stat.st_size} bytes, but {expected.size} when rank 0 verified the set: rewritten since."
        )
    if stat.st_mtime_ns != expected.mtime_ns:  # another node's copy, or touched: its own checksum decides
        digest, position = hashlib.sha256(), 0
        while block := os.pread(fd, 1 << 20, position):
            digest.update(block)
            position += len(block)
        if digest.hexdigest() != expected.sha256:
            raise AdapterFilesError(f"{path}: checksum differs from the manifest: the file was modified or corrupted.")
    meta, stored = _header(fd, path, stat.st_size)
    if meta.get("format") != FORMAT or meta.get("run_id") != expected.run_id:
        raise AdapterFilesError(f"{path}: not the shard of run {expected.run_id} that rank 0 verified.")
    if int(meta.get("rank", -1)) != expected.rank or int(meta.get("world_size", -1)) != expected.world_size:
        raise AdapterFilesError(f"{path}: written as rank {meta.get('rank')}, the manifest expects {expected.rank}.")
    offsets, entries = {}, set()
    try:
        for e in json.loads(meta.get("entries", "[]")):
            if e["adapter"] != expected.adapter:
                continue  # another adapter's run
            start, stop = int(e["start"]), int(e["stop"])
            dtype, offset, nbytes, _ = stored.get(e["tensor"], (None, 0, -1, ()))
            if dtype != e["dtype"] or nbytes != (stop - start) * dtype_from_name(dtype).itemsize:
                raise ValueError(f"tensor {e['tensor']!r} does not match its entry")
            entries.add((e["key"], start, stop))
            offsets[(e["key"], start)] = offset
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterFilesError(f"{path}: unreadable shard entries ({exc}); the file is corrupt.") from None
    if entries != expected.entries:
        raise AdapterFilesError(f"{path}: its runs differ from those rank 0 verified in it; the file was rewritten.")
    return offsets


def _header(fd: int, path: Path, file_size: int) -> tuple[dict, dict[str, tuple[str, int, int, tuple]]]:
    """A safetensors header read through an open descriptor: metadata, and `(dtype, offset, nbytes, shape)` per
    tensor, each range checked to lie inside the file."""
    try:
        (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if size > file_size - 8:
            raise ValueError(f"a header of {size} bytes in a file of {file_size}")
        header = json.loads(os.pread(fd, size, 8))
        meta = header.pop("__metadata__", None) or {}
        stored = {}
        for name, t in header.items():
            begin, end = (int(x) for x in t["data_offsets"])
            if not 0 <= begin <= end <= file_size - 8 - size:
                raise ValueError(f"{name}: bytes [{begin}, {end}) outside the data")
            stored[name] = (t["dtype"], 8 + size + begin, end - begin, tuple(int(n) for n in t["shape"]))
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise AdapterFilesError(f"{path}: unreadable safetensors header ({exc}); the file is corrupt.") from None
    return meta, stored


def _manifest(directory: Path) -> tuple[bytes, dict]:
    path = directory / MANIFEST_NAME
    try:
        raw = read_bytes(path)
        manifest = json.loads(raw)
        files = [(int(f["rank"]), str(f["name"]), int(f["size"]), str(f["sha256"])) for f in manifest["files"]]
        return raw, {"run_id": str(manifest["run_id"]), "world_size": int(manifest["world_size"]), "files": files}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterFilesError(f"{path}: not a readable shardsave manifest ({exc}).") from None


def open_shards(directory: Path, adapter_name: str) -> AdapterFiles:
    """Adapter `adapter_name` of the shard set in `directory` (the only one, if it holds one), verified whole."""
    raw, manifest = _manifest(directory)
    stats = {}  # taken before the checksums: a file changed after them shows a later mtime to the other ranks
    for _, name, _, _ in manifest["files"]:
        try:
            stats[directory / name] = (directory / name).stat().st_mtime_ns
        except OSError:
            pass  # read_shard_set names the missing file
    try:
        shard_set = read_shard_set(directory)
    except ValueError as exc:
        raise AdapterFilesError(str(exc)) from None
    if _manifest(directory)[0] != raw:
        raise AdapterFilesError(f"{directory}: its manifest changed while it was verified (a save is writing it).")
    names = list(shard_set.adapters)
    name = adapter_name if adapter_name in names else (names[0] if len(names) == 1 else None)
    if name is None:
        raise AdapterFilesError(
            f"{directory}: the shard set holds adapters {names}, none named {adapter_name!r}; pass adapter_name."
        )
    adapter = shard_set.adapters[name]
    config = json.loads(adapter["config"])
    specs = {key: shard_set.specs[name][key] for key in adapter["keys"]}
    runs = {
        key: [ElementRun(r.start, r.stop, r.path, r.offset) for r in shard_set.runs.get((name, key), [])]
        for key in adapter["keys"]
    }
    entries: dict[Path, set] = {}
    for key, key_runs in runs.items():
        for r in key_runs:
            entries.setdefault(r.path, set()).add((key, r.start, r.stop))
    verified = {
        directory / file: VerifiedShard(
            rank, size, stats[directory / file], sha256, manifest["run_id"], manifest["world_size"], name,
            frozenset(entries.get(directory / file, ())),
        )
        for rank, file, size, sha256 in manifest["files"]
    }  # fmt: skip
    digest = hashlib.sha256(raw).hexdigest()
    return AdapterFiles(directory, "shards", config, specs, runs, verified=verified, manifest_sha256=digest)


def _pack(rows: list[tuple[int, ...]], width: int) -> str:
    """Rows of ints, delta-coded by column, compressed: a regular layout (a run per rank) shrinks to almost nothing
    (lzma: 458752 runs of a ZeRO-3 set at 1024 ranks in 2.3 KB; zlib's 1:1000 limit left 40 KB)."""
    flat, previous = array("q"), [0] * width
    for row in rows:
        flat.extend(v - p for v, p in zip(row, previous, strict=True))
        previous = list(row)
    return base64.b64encode(lzma.compress(flat.tobytes(), preset=1)).decode()


def _unpack(text: str, width: int) -> list[tuple[int, ...]]:
    flat = array("q")
    flat.frombytes(lzma.decompress(base64.b64decode(text)))
    rows, previous = [], [0] * width
    for i in range(0, len(flat), width):
        previous = [p + d for p, d in zip(previous, flat[i : i + width], strict=True)]
        rows.append(tuple(previous))
    return rows


def shard_index(files: AdapterFiles) -> dict:
    """What another rank needs to read a shard set this rank verified (`open_adapter`): the manifest's digest, the
    config, shapes, which file holds which run, and each file's mtime as verified. JSON-able; its size grows with
    the tensors and runs, not with the bytes, and a regular layout's runs compress to almost nothing
    (`benchmarks/rank_count.py --parts load`)."""
    if files.kind != "shards":
        raise ValueError(f"{files.path}: not a shard set")
    order = list(files.verified)
    number = {path: i for i, path in enumerate(order)}
    keys = list(files.specs)
    rows = sorted(
        (k, number[r.path], r.start, r.stop) for k, key in enumerate(keys) for r in files.runs[key]
    )  # fmt: skip
    specs = [[key, list(files.specs[key].shape), dtype_name(files.specs[key].dtype)] for key in keys]
    return {
        "manifest": files.manifest_sha256,  # names, ranks, sizes and checksums: from the manifest on each rank
        "config": files.config,
        "adapter": next(iter(files.verified.values())).adapter,
        "specs": base64.b64encode(lzma.compress(json.dumps(specs).encode(), preset=1)).decode(),
        "mtimes": _pack([(v.mtime_ns,) for v in files.verified.values()], 1),
        "runs": _pack(rows, 4),
    }


def open_indexed(path: str | os.PathLike, index: dict) -> AdapterFiles:
    """The shard set at `path` as another rank verified it (`shard_index`): one read of the manifest here (it must
    be the one verified), no other file opened until `AdapterFiles.read` needs it, and each then checked once."""
    root = Path(os.path.abspath(os.fspath(path)))
    raw, manifest = _manifest(root)
    if hashlib.sha256(raw).hexdigest() != index["manifest"]:
        raise AdapterFilesError(
            f"{root}: its manifest differs from the one rank 0 verified: this rank sees another shard set (a node-"
            f"local folder holding another save, or a save rewrote it meanwhile)."
        )
    listed = json.loads(lzma.decompress(base64.b64decode(index["specs"])))
    keys = [key for key, _, _ in listed]
    specs = {key: TensorSpec(tuple(shape), dtype_from_name(dtype)) for key, shape, dtype in listed}
    paths = [root / name for _, name, _, _ in manifest["files"]]
    runs: dict[str, list[ElementRun]] = {key: [] for key in keys}
    entries: dict[Path, set] = {p: set() for p in paths}
    for k, f, start, stop in _unpack(index["runs"], 4):
        runs[keys[k]].append(ElementRun(start, stop, paths[f], -1))
        entries[paths[f]].add((keys[k], start, stop))
    mtimes = [mtime for (mtime,) in _unpack(index["mtimes"], 1)]
    run_id, world, adapter = manifest["run_id"], manifest["world_size"], index["adapter"]
    verified = {
        p: VerifiedShard(rank, size, mtime, sha256, run_id, world, adapter, frozenset(entries[p]))
        for p, (rank, _, size, sha256), mtime in zip(paths, manifest["files"], mtimes, strict=True)
    }
    return AdapterFiles(
        root, "shards", index["config"], specs, runs, verified=verified, manifest_sha256=index["manifest"],
        check_on_open=partial(_check_shard, verified),
    )  # fmt: skip
