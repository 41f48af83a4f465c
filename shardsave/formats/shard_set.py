"""The shard set, as a format: its names, its manifest, its shard headers, and the checks that make it one adapter.

Version `shardsave-shards/1`, in a directory (written by `shardsave.save.shards`):

- `shard-RRRRR-of-WWWWW.safetensors`, one per rank. Each tensor is a 1-D run of elements `[start, stop)` of
  the flattened full tensor. The safetensors metadata (all strings) holds:
  `format`, `run_id`, `world_size`, `rank`; `entries`: a JSON list of
  `{"tensor": <key in this file>, "adapter": <adapter name>, "key": <PEFT checkpoint key>,
  "shape": [...], "dtype": <safetensors dtype>, "start": s, "stop": e}`; `adapters`: a JSON object
  `{<adapter name>: {"config": <adapter_config.json text>, "keys": [<checkpoint keys in PEFT's order>]}}`;
  `card`: the README.md text.
- `manifest.json`, written by rank 0 after every rank reported its file written and fsynced:
  `{"format", "run_id", "world_size", "files": [{"rank", "name", "size", "sha256"}]}`.

`read_shard_set` checks a whole set before anything uses it (manifest, sizes, checksums, headers, one run, one
world size, one configuration, every element of every tensor covered exactly once), reading headers only; the
stitcher (`shardsave.save.stitch`) and the loader's reader (`shardsave.formats.adapter`) both start from it.
Reads go through `shardsave.storage.reads`; safetensors headers through `read_header` (safetensors' own bounds
checks, on a local path).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shardsave.errors import ShardSetError
from shardsave.plan.names import path_component
from shardsave.storage.reads import open_binary, read_bytes, read_range, read_text
from shardsave.storage.streaming import FileRange, TensorSpec, dtype_from_name, read_header

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "SHARD_PATTERN",
    "ShardSetError",
    "ShardRun",
    "ShardSet",
    "shard_name",
    "sha256_of",
    "shard_folders",
    "read_shard_set",
    "check_checksums",
    "byte_ranges",
    "read_tensor",
]

FORMAT = "shardsave-shards/1"
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = re.compile(r"^shard-(\d{5})-of-(\d{5})\.safetensors$")


def shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open_binary(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ShardRun:
    """One run of a tensor in a shard file: elements `[start, stop)` of the flattened tensor, stored as `tensor`."""

    path: Path
    tensor: str
    start: int
    stop: int
    offset: int  # of the run's bytes in the file


@dataclass
class ShardSet:
    """A validated shard set: what to write, and where each tensor's runs are."""

    directory: Path
    run_id: str
    world_size: int
    card: str
    adapters: dict[str, dict]  # name -> {"config": text, "keys": [...]}
    specs: dict[str, dict[str, TensorSpec]] = field(default_factory=dict)  # adapter -> key -> spec
    checksums: dict[Path, str] = field(default_factory=dict)  # the manifest's sha256 of each file
    runs: dict[tuple[str, str], list[ShardRun]] = field(default_factory=dict)


def shard_folders(shards_directory) -> list[Path]:
    """One folder, or several (a set written to node-local disks and copied back, one folder per node)."""
    given = [shards_directory] if isinstance(shards_directory, str | os.PathLike) else list(shards_directory)
    if not given:
        raise ShardSetError("no shard folder given.")
    folders = list(dict.fromkeys(Path(os.path.abspath(os.fspath(d))) for d in given))
    for folder in folders:
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "not a directory of shards"
            raise ShardSetError(f"{folder}: {what}.")
    return folders


def _load_manifest(folders: list[Path]) -> tuple[Path, dict]:
    """The manifest (rank 0 writes it into its own folder) and the folder holding it; with several folders,
    exactly one manifest, or identical copies of it."""
    found = [f / MANIFEST_NAME for f in folders if (f / MANIFEST_NAME).is_file()]
    if not found:
        where = folders[0] / MANIFEST_NAME if len(folders) == 1 else f"any of {[str(f) for f in folders]}"
        raise ShardSetError(
            f"{where}: missing. The manifest is written last, once every rank has written its shard: without it "
            f"the set is incomplete (a rank failed or is still writing). Re-run shardsave.save_shards."
            + ("" if len(folders) == 1 else " With node-local folders, copy rank 0's folder (it holds the manifest).")
        )
    if len({read_bytes(p) for p in found}) > 1:
        raise ShardSetError(f"{found[0]} and {found[1]}: two different manifests: the folders hold two runs.")
    path = found[0]
    try:
        manifest = json.loads(read_text(path))
        files, world = manifest["files"], int(manifest["world_size"])
        run_id = manifest["run_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardSetError(f"{path}: not a shardsave manifest ({exc}).") from None
    if manifest.get("format") != FORMAT:
        raise ShardSetError(f"{path}: format {manifest.get('format')!r}, this shardsave reads {FORMAT!r}.")
    ranks = sorted(int(f["rank"]) for f in files)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise ShardSetError(f"{path}: lists ranks {ranks} for a world of {world}; missing rank(s) {missing}.")
    for f in files:  # each joined to the shard folders: a name from the file must not reach outside them
        path_component(f.get("name"), source=path, what="shard file name", error=ShardSetError,
                       fix="The manifest is damaged or was not written by shardsave.save_shards.")  # fmt: skip
    _check_foreign(folders, {f["name"] for f in files}, run_id, world)
    return path.parent, manifest


def _check_foreign(folders: list[Path], listed: set[str], run_id: str, world: int) -> None:
    """No pickle among the shards, and no shard file the manifest does not list (another run's)."""
    for directory in folders:
        pickles = sorted(
            p.name for p in directory.iterdir() if p.name.startswith("shard-") and p.suffix in (".bin", ".pt", ".pth")
        )
        if pickles:
            raise ShardSetError(
                f"{directory / pickles[0]}: a pickle file among the shards. Shard files are safetensors only, and "
                f"shardsave never unpickles a shard (loading a pickle can run code); remove it, or re-run "
                f"save_shards into an empty directory."
            )
        foreign = sorted(p.name for p in directory.iterdir() if SHARD_PATTERN.match(p.name) and p.name not in listed)
        if foreign:
            raise ShardSetError(
                f"{directory / foreign[0]}: a shard file that the manifest (run {run_id}, {world} ranks) does not "
                f"list; it belongs to another run or world size. Remove it, or re-run save_shards into an empty "
                f"directory."
            )


def _locate(folders: list[Path], name: str, item: dict, world: int) -> Path:
    """The one folder holding shard file `name` (copies of it in several folders must be the same file)."""
    found = [f / name for f in folders if (f / name).is_file()]
    if not found:
        where = folders[0] / name if len(folders) == 1 else f"{name} (in none of {[str(f) for f in folders]})"
        raise ShardSetError(f"{where}: missing (rank {item['rank']} of {world}).")
    if len({p.stat().st_size for p in found}) > 1:
        raise ShardSetError(f"{found[0]} and {found[1]}: two different copies of rank {item['rank']}'s shard.")
    return found[0]


def read_shard_set(shards_directory, *, verify_checksums: bool = True) -> ShardSet:
    """Validate the set in `shards_directory` (a folder, or a list of folders: one per node for node-local
    disks) completely, reading headers only (and, unless told not to, checksums: `merge_shards` checks them
    itself, in parallel with its write)."""
    folders = shard_folders(shards_directory)
    directory, manifest = _load_manifest(folders)
    run_id, world = manifest["run_id"], int(manifest["world_size"])
    shard_set: ShardSet | None = None
    checksums = {}
    for item in sorted(manifest["files"], key=lambda f: int(f["rank"])):
        path = _locate(folders, item["name"], item, world)
        if path.stat().st_size != int(item["size"]):
            raise ShardSetError(
                f"{path}: {path.stat().st_size} bytes, the manifest says {item['size']}: truncated or rewritten."
            )
        checksums[path] = item["sha256"]
        shard_set = _add_shard(shard_set, directory, path, item, run_id, world)
    assert shard_set is not None
    shard_set.checksums = checksums
    _check_coverage(shard_set)
    if verify_checksums:
        check_checksums(shard_set, {path: sha256_of(path) for path in checksums})
    return shard_set


def _add_shard(
    shard_set: ShardSet | None, directory: Path, path: Path, item: dict, run_id: str, world: int
) -> ShardSet:
    """The set with one shard file's runs added, once its header is proven to be of this run and rank."""
    try:
        meta, stored = read_header(path)
    except ValueError as exc:
        raise ShardSetError(str(exc)) from None
    if meta.get("format") != FORMAT:
        raise ShardSetError(f"{path}: not a shardsave shard (format {meta.get('format')!r}).")
    if meta.get("run_id") != run_id:
        raise ShardSetError(
            f"{path}: from run {meta.get('run_id')}, but the manifest is for run {run_id}: two runs are mixed."
        )
    if int(meta.get("world_size", -1)) != world or int(meta.get("rank", -1)) != int(item["rank"]):
        raise ShardSetError(
            f"{path}: written as rank {meta.get('rank')} of {meta.get('world_size')}, the manifest expects rank "
            f"{item['rank']} of {world}."
        )
    adapters = json.loads(meta["adapters"])
    for name in adapters:  # each becomes the output's `<name>/` folder
        fix = "The shard's header is damaged or was not written by shardsave.save_shards."
        path_component(name, source=path, error=ShardSetError, fix=fix)
    if shard_set is None:
        shard_set = ShardSet(directory, run_id, world, meta["card"], adapters)
    elif adapters != shard_set.adapters or meta["card"] != shard_set.card:
        raise ShardSetError(f"{path}: its adapter configuration or card differs from rank 0's.")
    for e in json.loads(meta["entries"]):
        spec = TensorSpec(tuple(e["shape"]), dtype_from_name(e["dtype"]))
        known = shard_set.specs.setdefault(e["adapter"], {}).setdefault(e["key"], spec)
        if known != spec:
            raise ShardSetError(f"{path}: {e['key']} is {spec} here but {known} in another shard.")
        start, stop = int(e["start"]), int(e["stop"])
        dtype, offset, nbytes, _ = stored.get(e["tensor"], (None, 0, -1, ()))
        if dtype != e["dtype"] or nbytes != (stop - start) * spec.dtype.itemsize:
            raise ShardSetError(
                f"{path}: tensor {e['tensor']!r} is {dtype} of {nbytes} bytes, its entry says {e['dtype']} "
                f"elements [{start}, {stop}); the file is inconsistent."
            )
        run = ShardRun(path, e["tensor"], start, stop, offset)
        shard_set.runs.setdefault((e["adapter"], e["key"]), []).append(run)
    return shard_set


def check_checksums(shard_set: ShardSet, actual: dict[Path, str]) -> None:
    """Each file's `actual` sha256 is the manifest's."""
    for path, expected in shard_set.checksums.items():
        if actual[path] != expected:
            raise ShardSetError(f"{path}: checksum differs from the manifest: the file was modified or corrupted.")


def _check_coverage(shard_set: ShardSet) -> None:
    for name, adapter in shard_set.adapters.items():
        for key in adapter["keys"]:
            runs = sorted(shard_set.runs.get((name, key), []), key=lambda r: (r.start, r.stop))
            spec = shard_set.specs.get(name, {}).get(key)
            numel = 0 if spec is None else spec.nbytes // spec.dtype.itemsize
            position = 0
            for run in runs:
                if run.start != position:
                    problem = "overlap" if run.start < position else "gap"
                    raise ShardSetError(
                        f"{run.path}: {key} (adapter {name!r}) has a {problem} at element {min(position, run.start)}: "
                        f"every element must be covered exactly once."
                    )
                position = run.stop
            if spec is None or position != numel:
                raise ShardSetError(
                    f"{shard_set.directory}: {key} (adapter {name!r}) covers {position} of {numel} elements: a shard "
                    f"is missing data."
                )
        extra = set(k for (a, k) in shard_set.runs if a == name) - set(adapter["keys"])
        if extra:
            raise ShardSetError(f"{shard_set.directory}: tensors {sorted(extra)[:3]} are not part of adapter {name!r}.")


def byte_ranges(shard_set: ShardSet, adapter: str, key: str) -> list[FileRange]:
    """Where a tensor's bytes are, in order (coverage is checked: the runs tile it exactly)."""
    runs = sorted(shard_set.runs[(adapter, key)], key=lambda r: r.start)
    itemsize = shard_set.specs[adapter][key].dtype.itemsize
    return [FileRange(r.path, r.offset, (r.stop - r.start) * itemsize) for r in runs if r.stop > r.start]


def read_tensor(shard_set: ShardSet, adapter: str, key: str) -> torch.Tensor:
    """The full tensor, read from the same byte ranges the plain stitch copies."""
    spec = shard_set.specs[adapter][key]
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=spec.dtype)
    data = bytearray(spec.nbytes)
    view, position = memoryview(data), 0
    for r in byte_ranges(shard_set, adapter, key):
        chunk = read_range(r.path, r.offset, r.nbytes)
        if len(chunk) != r.nbytes:
            raise ShardSetError(f"{r.path}: ended before byte {r.offset + r.nbytes}; the file was truncated.")
        view[position : position + r.nbytes] = chunk
        position += r.nbytes
    return torch.frombuffer(data, dtype=spec.dtype).view(spec.shape)
