"""A saved adapter as element ranges on disk: which tensors it has, and any range of any of them, read alone.

Loading into a sharded model (`shardsave.load`) needs, on each rank, only the elements that rank holds. A
safetensors file stores each tensor's bytes at an offset its header gives; a shard set (`shardsave.save.shards`)
stores runs of elements whose offsets its headers give. Both are "runs of the flattened tensor at byte offsets
in files", so one reader serves both, and `shardsave.plan.ranges.read_items` says which runs a range needs: whatever
world size and backend saved the adapter, a rank reads only its own bytes. A `.bin` (a pickle) is read only
when allowed, weights-only and memory-mapped.

Each file is opened once per `AdapterFiles` and kept open across reads (`close` ends them): a ZeRO-3 rank reads
one range of every tensor, and an open per range was ~570k opens of one file at 512 ranks. In a distributed load
one rank verifies a shard set (`open_adapter`, checksums included) and describes it in an index (`shard_index`);
the others open from that index (`open_indexed`) only the shard files that hold their ranges, each checked to be
the file that rank verified (size and mtime, else its own checksum) before a byte of it is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
import math
import os
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shardsave.errors import AdapterFilesError
from shardsave.plan.names import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, path_component
from shardsave.plan.ranges import read_items
from shardsave.storage.streaming import TensorSpec, dtype_from_name, dtype_name, read_header

__all__ = ["AdapterFilesError", "AdapterFiles", "open_adapter", "is_shard_set", "shard_index", "open_indexed"]


@dataclass(frozen=True, slots=True)
class _Run:
    start: int  # elements [start, stop) of the flattened tensor
    stop: int
    path: Path
    offset: int  # byte offset of element `start` in the file; -1: not known until the file's header is read


@dataclass(frozen=True, slots=True)
class _Verified:
    """A shard file as the verifying rank checked it: what another rank must find before reading it."""

    rank: int
    size: int
    mtime_ns: int
    sha256: str
    run_id: str
    world_size: int
    adapter: str  # the adapter read (a set may hold several, under the same keys)
    entries: frozenset  # (key, start, stop) of the adapter's runs in this file


@dataclass
class AdapterFiles:
    """One adapter of a saved folder or shard set: its config, its tensors' shapes and dtypes, their runs."""

    path: Path  # what was opened: the adapter folder, or the shard set
    kind: str  # "safetensors" | "bin" | "shards"
    config: dict  # adapter_config.json as saved
    specs: dict[str, TensorSpec]  # checkpoint key -> full shape and dtype, in the file's order
    runs: dict[str, list[_Run]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # `.bin`: memory-mapped

    verified: dict[Path, _Verified] = field(default_factory=dict)  # each shard file as the verifying rank saw it
    manifest_sha256: str = ""
    check_on_open: bool = False  # opened from another rank's index: each file is checked at its first use
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)
    _offsets: dict[Path, dict[tuple[str, int], int]] = field(default_factory=dict, repr=False)

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements `[start, stop)` of the flattened tensor `key`, as a new 1-D CPU tensor in the saved dtype."""
        spec = self.specs[key]
        if self.kind == "bin":
            return self.tensors[key].reshape(-1)[start:stop].clone()
        out = torch.empty(stop - start, dtype=spec.dtype)
        if stop <= start:
            return out
        runs = self.runs[key]
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        size = spec.dtype.itemsize
        try:
            items = read_items([(r.start, r.stop) for r in runs], start, stop)
        except ValueError as exc:
            raise AdapterFilesError(f"{self.path}: {key}: {exc}.") from None
        for item in items:
            run = runs[item.run]
            lo, n = (item.start - start) * size, (item.stop - item.start) * size
            fd = self._fd(run.path)
            offset = run.offset if run.offset >= 0 else self._offsets[run.path][(key, run.start)]
            got = os.preadv(fd, [view[lo : lo + n]], offset + item.offset * size)
            if got != n:
                raise AdapterFilesError(f"{run.path}: ended before byte {offset + item.offset * size + n}: truncated.")
        return out

    def opened(self) -> list[Path]:
        """The files read so far (each opened once)."""
        return list(self._fds)

    def close(self) -> None:
        """Close the files kept open across reads."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> AdapterFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise AdapterFilesError(f"{path}: cannot be opened ({exc.strerror}).") from None
            self._fds[path] = fd
            if self.check_on_open:
                try:
                    self._offsets[path] = _check_shard(fd, path, self.verified[path])
                except AdapterFilesError:
                    self._fds.pop(path)
                    os.close(fd)
                    raise
        return fd


def _check_shard(fd: int, path: Path, verified: _Verified) -> dict[tuple[str, int], int]:
    """The byte offset of each run in an indexed shard file, once it is proven to be the file the verifying rank
    checked: the same size and mtime, or else the manifest's checksum; and a header listing exactly the runs the
    index gives this file."""
    stat = os.fstat(fd)
    if stat.st_size != verified.size:
        raise AdapterFilesError(
            f"{path}: {stat.st_size} bytes, but {verified.size} when rank 0 verified the set: rewritten since."
        )
    if stat.st_mtime_ns != verified.mtime_ns:  # another node's copy, or touched: its own checksum decides
        digest, position = hashlib.sha256(), 0
        while block := os.pread(fd, 1 << 20, position):
            digest.update(block)
            position += len(block)
        if digest.hexdigest() != verified.sha256:
            raise AdapterFilesError(f"{path}: checksum differs from the manifest: the file was modified or corrupted.")
    meta, stored = _header(fd, path, stat.st_size)
    if meta.get("format") != _shard_format() or meta.get("run_id") != verified.run_id:
        raise AdapterFilesError(f"{path}: not the shard of run {verified.run_id} that rank 0 verified.")
    if int(meta.get("rank", -1)) != verified.rank or int(meta.get("world_size", -1)) != verified.world_size:
        raise AdapterFilesError(f"{path}: written as rank {meta.get('rank')}, the manifest expects {verified.rank}.")
    offsets, entries = {}, set()
    try:
        for e in json.loads(meta.get("entries", "[]")):
            if e["adapter"] != verified.adapter:
                continue  # another adapter's run
            start, stop = int(e["start"]), int(e["stop"])
            dtype, offset, nbytes, _ = stored.get(e["tensor"], (None, 0, -1, ()))
            if dtype != e["dtype"] or nbytes != (stop - start) * dtype_from_name(dtype).itemsize:
                raise ValueError(f"tensor {e['tensor']!r} does not match its entry")
            entries.add((e["key"], start, stop))
            offsets[(e["key"], start)] = offset
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterFilesError(f"{path}: unreadable shard entries ({exc}); the file is corrupt.") from None
    if entries != verified.entries:
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


def _shard_format() -> str:
    from shardsave.save.shards import FORMAT

    return FORMAT


def _adapter_folder(path: Path, adapter_name: str) -> Path | None:
    """The folder holding the adapter's config: `path/<adapter_name>` (PEFT's layout for a non-default adapter
    saved beside others) when there is one, else `path` itself (a folder of that adapter alone)."""
    if adapter_name != "default":  # the folder PEFT would read it from: `path/<adapter_name>`
        fix = "Pass the name of an adapter saved in that folder (adapter_name, --selected-adapters)."
        path_component(adapter_name, source=path, error=AdapterFilesError, fix=fix)
    if adapter_name != "default" and (path / adapter_name / CONFIG_NAME).is_file():
        return path / adapter_name
    if (path / CONFIG_NAME).is_file():
        return path
    return None


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterFilesError(f"{path}: unreadable ({exc}).") from None
    if not isinstance(config, dict):
        raise AdapterFilesError(f"{path}: holds {type(config).__name__}, not a JSON object.")
    return config


def _open_folder(folder: Path, allow_pickle: bool) -> AdapterFiles:
    config = _read_config(folder / CONFIG_NAME)
    safetensors = folder / SAFETENSORS_NAME
    if safetensors.is_file():
        try:
            _, stored = read_header(safetensors)
        except ValueError as exc:
            raise AdapterFilesError(str(exc)) from None
        specs, runs = {}, {}
        for key, (dtype, offset, nbytes, shape) in stored.items():
            spec = TensorSpec(shape, dtype_from_name(dtype))
            if spec.nbytes != nbytes:
                raise AdapterFilesError(f"{safetensors}: {key} has {nbytes} bytes for {spec}; the file is corrupt.")
            specs[key] = spec
            runs[key] = [_Run(0, math.prod(spec.shape), safetensors, offset)]
        return AdapterFiles(folder, "safetensors", config, specs, runs)
    binary = folder / BIN_NAME
    if not binary.is_file():
        raise AdapterFilesError(f"{folder}: has {CONFIG_NAME} but neither {SAFETENSORS_NAME} nor {BIN_NAME}.")
    if not allow_pickle:
        raise AdapterFilesError(
            f"{binary}: a pickle, and shardsave does not unpickle files unless asked (loading a pickle can run "
            f"code). Pass allow_pickle=True to read it with torch.load(weights_only=True), or save as safetensors."
        )
    try:
        tensors = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise AdapterFilesError(f"{binary}: not loadable with torch.load(weights_only=True) ({exc}).") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterFilesError(f"{binary}: holds {type(tensors).__name__}, not a dict of named tensors.")
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return AdapterFiles(folder, "bin", config, specs, tensors=tensors)


def _manifest(directory: Path) -> tuple[bytes, dict]:
    from shardsave.save.shards import MANIFEST_NAME

    path = directory / MANIFEST_NAME
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw)
        files = [(int(f["rank"]), str(f["name"]), int(f["size"]), str(f["sha256"])) for f in manifest["files"]]
        return raw, {"run_id": str(manifest["run_id"]), "world_size": int(manifest["world_size"]), "files": files}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterFilesError(f"{path}: not a readable shardsave manifest ({exc}).") from None


def _open_shards(directory: Path, adapter_name: str) -> AdapterFiles:
    from shardsave.save.stitch import read_shard_set

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
        key: [_Run(r.start, r.stop, r.path, r.offset) for r in shard_set.runs.get((name, key), [])]
        for key in adapter["keys"]
    }
    entries: dict[Path, set] = {}
    for key, key_runs in runs.items():
        for r in key_runs:
            entries.setdefault(r.path, set()).add((key, r.start, r.stop))
    verified = {
        directory / file: _Verified(
            rank, size, stats[directory / file], sha256, manifest["run_id"], manifest["world_size"], name,
            frozenset(entries.get(directory / file, ())),
        )
        for rank, file, size, sha256 in manifest["files"]
    }  # fmt: skip
    digest = hashlib.sha256(raw).hexdigest()
    return AdapterFiles(directory, "shards", config, specs, runs, verified=verified, manifest_sha256=digest)


def is_shard_set(path: str | os.PathLike) -> bool:
    """Whether `path` is a shard set (a folder holding a manifest), as `open_adapter` decides."""
    from shardsave.save.shards import MANIFEST_NAME

    return (Path(os.path.abspath(os.fspath(path))) / MANIFEST_NAME).is_file()


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
    runs: dict[str, list[_Run]] = {key: [] for key in keys}
    entries: dict[Path, set] = {p: set() for p in paths}
    for k, f, start, stop in _unpack(index["runs"], 4):
        runs[keys[k]].append(_Run(start, stop, paths[f], -1))
        entries[paths[f]].add((keys[k], start, stop))
    mtimes = [mtime for (mtime,) in _unpack(index["mtimes"], 1)]
    run_id, world, adapter = manifest["run_id"], manifest["world_size"], index["adapter"]
    verified = {
        p: _Verified(rank, size, mtime, sha256, run_id, world, adapter, frozenset(entries[p]))
        for p, (rank, _, size, sha256), mtime in zip(paths, manifest["files"], mtimes, strict=True)
    }
    return AdapterFiles(
        root, "shards", index["config"], specs, runs, verified=verified, manifest_sha256=index["manifest"],
        check_on_open=True,
    )  # fmt: skip


def open_adapter(path: str | os.PathLike, adapter_name: str = "default", *, allow_pickle: bool = False) -> AdapterFiles:
    """The adapter saved at `path`: a PEFT adapter folder (PEFT's or shardsave's, safetensors or `.bin`), the
    folder of a save holding `adapter_name` in a subfolder, or a shardsave shard set (any world size; validated
    and checksummed as the merge does). Headers only: no tensor is read until `AdapterFiles.read`."""
    from shardsave.save.shards import MANIFEST_NAME

    root = Path(os.path.abspath(os.fspath(path)))
    if not root.is_dir():
        raise AdapterFilesError(f"{root}: {'does not exist' if not root.exists() else 'not a folder'}.")
    if (root / MANIFEST_NAME).is_file():
        return _open_shards(root, adapter_name)
    folder = _adapter_folder(root, adapter_name)
    if folder is None:
        raise AdapterFilesError(
            f"{root}: no {CONFIG_NAME} here"
            + (f" or in {adapter_name}/" if adapter_name != "default" else "")
            + " and no shard set (manifest.json). Pass the folder save_pretrained or PeftModel.save_pretrained wrote, "
            "or a shard set; for a DeepSpeed or DCP checkpoint, rescue the adapter first: python -m shardsave.merge "
            "CHECKPOINT -o ADAPTER."
        )
    return _open_folder(folder, allow_pickle)
