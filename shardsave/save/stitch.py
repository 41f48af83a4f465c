"""Stitch a shard set (written by `shardsave.save.shards`) into the adapter directory `save_pretrained` would write.

    python -m shardsave.merge SHARDS_DIR [-o OUTPUT_DIR] [--bin] [--overwrite]

The command line is `shardsave.cli.merge`'s (the same command rescues an adapter from a framework checkpoint,
`shardsave.rescue`, and merges one into a base model, `shardsave.merged`); this module is the library it calls.

Reads only the files: no process group, no GPU. The whole set is checked before anything is written
(`shardsave.formats.shard_set.read_shard_set`: manifest, sizes, checksums, headers, one run, one world size, one
configuration, every element of every tensor covered exactly once); the output is then published atomically.
Safetensors output is streamed one tensor at a time, so memory stays around the largest tensor (`--bin` needs the
whole adapter in memory).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from shardsave.checks.verify import verify_adapter, warn_findings
from shardsave.errors import ShardSetError
from shardsave.formats.initial import read_checked_initial
from shardsave.formats.shard_set import (
    ShardSet,
    byte_ranges,
    check_checksums,
    read_shard_set,
    read_tensor,
    sha256_of,
    shard_folders,
)
from shardsave.log import logger
from shardsave.plan.names import BIN_NAME, CARD_NAME, CONFIG_NAME, SAFETENSORS_NAME, adapter_dir
from shardsave.storage.files import make_dirs, write_text
from shardsave.storage.local import check_destination, check_overwrite, publish
from shardsave.storage.streaming import FileRange, TensorSpec, write_streaming
from shardsave.tensors.convert import convert_config_dict, convert_tensor, converted_shape

__all__ = ["ShardSetError", "ShardSet", "read_shard_set", "merge_shards", "default_output"]


def default_output(shards_directory: str | os.PathLike) -> Path:
    """Where the merge writes without `-o`: next to the shards, `<shards>-merged`."""
    shards = Path(os.path.abspath(os.fspath(shards_directory)))
    return shards.parent / f"{shards.name}-merged"


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
    folders = shard_folders(shards_directory)
    output = check_destination(output_directory if output_directory is not None else default_output(folders[0]))
    shard_set = read_shard_set(folders, verify_checksums=False)
    initial = None
    if path_initial_model_for_weight_conversion is not None:
        initial = _check_conversion(shard_set, path_initial_model_for_weight_conversion, allow_pickle)
    check_overwrite(output, overwrite, ShardSetError)
    if any(output == f or f in output.parents for f in folders):
        raise ShardSetError(f"{output}: inside a shard directory; write the adapter elsewhere.")

    bar = _progress(sum(len(a["keys"]) for a in shard_set.adapters.values()), progress)

    # checksums are computed while the output is written (hashlib releases the GIL) and checked before the
    # output is published: a mismatch still publishes nothing
    pool = ThreadPoolExecutor(max_workers=min(len(shard_set.checksums), os.cpu_count() or 1))
    digests = {path: pool.submit(sha256_of, path) for path in shard_set.checksums}

    def fill(tmp: Path) -> None:
        _write_output(tmp)
        check_checksums(shard_set, {path: future.result() for path, future in digests.items()})
        # what was written, read back one tensor at a time: a warning, published all the same
        warn_findings(verify_adapter(tmp, allow_pickle=True).findings, output)

    def _write_output(tmp: Path) -> None:
        write_text(tmp / CARD_NAME, shard_set.card)
        for name, adapter in shard_set.adapters.items():
            out = adapter_dir(tmp, name)
            make_dirs(out)
            config = adapter["config"]
            specs = shard_set.specs.get(name, {})
            if initial is not None:
                config = json.dumps(convert_config_dict(json.loads(config)), indent=2, sort_keys=True)
                specs = {
                    k: TensorSpec(converted_shape(k, v.shape, tuple(initial[k].shape)) if k in initial else v.shape,
                                  v.dtype)
                    for k, v in specs.items()
                }  # fmt: skip
            write_text(out / CONFIG_NAME, config)

            def produce(key: str, name: str = name) -> torch.Tensor | list[FileRange]:
                if initial is None and safe_serialization:  # the bytes as they are: copied by the kernel
                    return byte_ranges(shard_set, name, key)
                tensor = read_tensor(shard_set, name, key)
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
    shapes = {k: v.shape for k, v in shard_set.specs.get(name, {}).items()}
    return read_checked_initial(name, json.loads(adapter["config"]), shapes, initial_path, allow_pickle=allow_pickle)
