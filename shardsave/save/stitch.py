"""Stitch a shard set (see `shardsave.save.shards`) into the adapter directory `save_pretrained` would write.

    python -m shardsave.merge SHARDS_DIR [-o OUTPUT_DIR] [--bin] [--overwrite]

The command line is `shardsave.cli.merge`'s (the same command rescues an adapter from a framework checkpoint,
`shardsave.rescue`, and merges one into a base model, `shardsave.merged`); this module is the library it calls.

Reads only the files: no process group, no GPU. The whole set is checked before anything is written
(manifest, sizes, checksums, headers, one run, one world size, one configuration, every element of every
tensor covered exactly once); the output is then published atomically. Safetensors output is streamed one
tensor at a time, so memory stays around the largest tensor (`--bin` needs the whole adapter in memory).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shardsave.checks.verify import verify_adapter, warn_findings
from shardsave.errors import ShardSetError
from shardsave.log import logger
from shardsave.plan.names import path_component
from shardsave.save.shards import FORMAT, MANIFEST_NAME, SHARD_PATTERN, sha256_of
from shardsave.storage.local import (
    BIN_NAME,
    CARD_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    adapter_dir,
    check_destination,
    publish,
)
from shardsave.storage.streaming import FileRange, TensorSpec, dtype_from_name, read_header, write_streaming
from shardsave.tensors.convert import (
    check_convertible,
    check_initial,
    convert_config_dict,
    convert_tensor,
    converted_shape,
    read_initial_adapter,
)

__all__ = ["ShardSetError", "ShardSet", "read_shard_set", "merge_shards", "default_output"]


@dataclass(frozen=True, slots=True)
class _Run:
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
    runs: dict[tuple[str, str], list[_Run]] = field(default_factory=dict)


def default_output(shards_directory: str | os.PathLike) -> Path:
    """Where the merge writes without `-o`: next to the shards, `<shards>-merged`."""
    shards = Path(os.path.abspath(os.fspath(shards_directory)))
    return shards.parent / f"{shards.name}-merged"


def _folders(shards_directory) -> list[Path]:
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
    if len({p.read_bytes() for p in found}) > 1:
        raise ShardSetError(f"{found[0]} and {found[1]}: two different manifests: the folders hold two runs.")
    path = found[0]
    try:
        manifest = json.loads(path.read_text())
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
    listed = {f["name"] for f in files}
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
    return path.parent, manifest


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
    folders = _folders(shards_directory)
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
            shard_set.runs.setdefault((e["adapter"], e["key"]), []).append(_Run(path, e["tensor"], start, stop, offset))
    assert shard_set is not None
    shard_set.checksums = checksums
    _check_coverage(shard_set)
    if verify_checksums:
        _verify(shard_set, {path: sha256_of(path) for path in checksums})
    return shard_set


def _verify(shard_set: ShardSet, actual: dict[Path, str]) -> None:
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


def _ranges(shard_set: ShardSet, adapter: str, key: str) -> list[FileRange]:
    """Where a tensor's bytes are, in order (coverage is checked: the runs tile it exactly)."""
    runs = sorted(shard_set.runs[(adapter, key)], key=lambda r: r.start)
    itemsize = shard_set.specs[adapter][key].dtype.itemsize
    return [FileRange(r.path, r.offset, (r.stop - r.start) * itemsize) for r in runs if r.stop > r.start]


def _assemble(shard_set: ShardSet, adapter: str, key: str) -> torch.Tensor:
    """The full tensor, read from the same byte ranges the plain merge copies."""
    spec = shard_set.specs[adapter][key]
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=spec.dtype)
    data = bytearray(spec.nbytes)
    view, position = memoryview(data), 0
    for r in _ranges(shard_set, adapter, key):
        with open(r.path, "rb") as f:
            f.seek(r.offset)
            if f.readinto(view[position : position + r.nbytes]) != r.nbytes:
                raise ShardSetError(f"{r.path}: ended before byte {r.offset + r.nbytes}; the file was truncated.")
        position += r.nbytes
    return torch.frombuffer(data, dtype=spec.dtype).view(spec.shape)


def _progress(total: int, enabled: bool | None):
    enabled = sys.stderr.isatty() if enabled is None else enabled
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="merging", unit="tensor", file=sys.stderr)


def merge_shards(
    shards_directory: str | os.PathLike | Sequence[str | os.PathLike],
    output_directory: str | os.PathLike | None = None,
    *,
    safe_serialization: bool = True,
    path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write the adapter directory for the shard set in `shards_directory` (a folder, or a list of folders: a set
    written to node-local disks with `save_shards(..., shared_filesystem=False)` and copied back); return its path.

    Everything is validated first; on any problem `ShardSetError` is raised and nothing is written. An
    existing output is only replaced with `overwrite=True`, and then whole (see `shardsave.storage.local.publish`).
    """
    folders = _folders(shards_directory)
    output = check_destination(output_directory if output_directory is not None else default_output(folders[0]))
    shard_set = read_shard_set(folders, verify_checksums=False)
    initial = None
    if path_initial_model_for_weight_conversion is not None:
        initial = _check_conversion(shard_set, path_initial_model_for_weight_conversion, allow_pickle)
    if output.exists() and not overwrite:
        raise ShardSetError(f"{output}: already exists; pass overwrite=True (--overwrite) to replace it.")
    if any(output == f or f in output.parents for f in folders):
        raise ShardSetError(f"{output}: inside a shard directory; write the adapter elsewhere.")

    bar = _progress(sum(len(a["keys"]) for a in shard_set.adapters.values()), progress)

    # checksums are computed while the output is written (hashlib releases the GIL) and checked before the
    # output is published: a mismatch still publishes nothing
    pool = ThreadPoolExecutor(max_workers=min(len(shard_set.checksums), os.cpu_count() or 1))
    digests = {path: pool.submit(sha256_of, path) for path in shard_set.checksums}

    def fill(tmp: Path) -> None:
        _write_output(tmp)
        _verify(shard_set, {path: future.result() for path, future in digests.items()})
        # what was written, read back one tensor at a time: a warning, published all the same
        warn_findings(verify_adapter(tmp, allow_pickle=True).findings, output)

    def _write_output(tmp: Path) -> None:
        (tmp / CARD_NAME).write_text(shard_set.card)
        for name, adapter in shard_set.adapters.items():
            out = adapter_dir(tmp, name)
            out.mkdir(exist_ok=True)
            config = adapter["config"]
            specs = shard_set.specs.get(name, {})
            if initial is not None:
                config = json.dumps(convert_config_dict(json.loads(config)), indent=2, sort_keys=True)
                specs = {
                    k: TensorSpec(converted_shape(k, v.shape, tuple(initial[k].shape)) if k in initial else v.shape,
                                  v.dtype)
                    for k, v in specs.items()
                }  # fmt: skip
            (out / CONFIG_NAME).write_text(config)

            def produce(key: str, name: str = name) -> torch.Tensor | list[FileRange]:
                if initial is None and safe_serialization:  # the bytes as they are: copied by the kernel
                    return _ranges(shard_set, name, key)
                tensor = _assemble(shard_set, name, key)
                return tensor if initial is None else convert_tensor(key, tensor, initial.get(key))

            if safe_serialization:
                write_streaming(
                    out / SAFETENSORS_NAME,
                    specs,
                    produce,
                    metadata={"format": "pt"},
                    on_tensor=(lambda _: bar.update(1)) if bar is not None else None,
                )
            else:
                tensors = {key: produce(key) for key in adapter["keys"]}
                torch.save(tensors, out / BIN_NAME)
                if bar is not None:
                    bar.update(len(tensors))

    started = time.perf_counter()
    try:
        publish(output, fill)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    tensors = sum(len(a["keys"]) for a in shard_set.adapters.values())
    logger.info("merged %d shard files (%d tensors) from %s into %s in %.2f s", shard_set.world_size, tensors,
                shard_set.directory, output, time.perf_counter() - started)  # fmt: skip
    return output


def _check_conversion(shard_set: ShardSet, initial_path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if len(shard_set.adapters) != 1:
        raise ShardSetError(
            f"--initial-adapter converts one adapter, but the set holds {sorted(shard_set.adapters)}; save the "
            f"PiSSA/CorDA/OLoRA adapter's shards on their own (selected_adapters=[name])."
        )
    ((name, adapter),) = shard_set.adapters.items()
    check_convertible(name, json.loads(adapter["config"]))
    initial = read_initial_adapter(initial_path, allow_pickle=allow_pickle)
    check_initial({k: v.shape for k, v in shard_set.specs.get(name, {}).items()}, initial, os.fspath(initial_path))
    return initial
