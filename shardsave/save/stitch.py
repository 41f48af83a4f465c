"""Stitch a shard set (written by `shardsave.save.shards`) into the adapter directory `save_pretrained` would write.

    python -m shardsave.merge SHARDS_DIR [-o OUTPUT_DIR] [--bin] [--overwrite]

The same command rescues the adapter from a DeepSpeed or DCP checkpoint (see `shardsave.rescue`), and with
`--into BASE` merges the adapter (folder, shard set or checkpoint) into a base model's full weights for
deployment (see `shardsave.merged`).

Reads only the files: no process group, no GPU. The whole set is checked before anything is written
(`shardsave.formats.shard_set.read_shard_set`: manifest, sizes, checksums, headers, one run, one world size, one
configuration, every element of every tensor covered exactly once); the output is then published atomically.
Safetensors output is streamed one tensor at a time, so memory stays around the largest tensor (`--bin` needs the
whole adapter in memory).
"""

from __future__ import annotations

import argparse
import gc
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

__all__ = ["ShardSetError", "ShardSet", "read_shard_set", "merge_shards", "default_output", "main"]


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


def _import_for_rescue() -> None:
    """The rescue builds the model's structure with peft and transformers: imported here, then their objects
    moved out of the garbage collector's sight (`gc.freeze`, undone once the rescue is done), so that no full
    collection over them lands in the rescue (measured: ~250 ms of a ~400 ms rescue)."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    gc.collect()
    gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shardsave.merge",
        description="Write the adapter directory PeftModel.save_pretrained would write (adapter_model.safetensors, "
        "adapter_config.json, README.md) from the per-rank shards of shardsave.save_shards, or rescue it from a "
        "DeepSpeed ZeRO or torch.distributed.checkpoint (DCP / FSDP) checkpoint, or a Trainer checkpoint-N/ "
        "holding one, reading only the adapter's bytes.",
        epilog="Exit status: 0 written; 2 the source or the output is not acceptable (nothing written); "
        "1 writing failed (disk full, unwritable; nothing published) or an unexpected error.",
    )
    parser.add_argument(
        "shards",
        metavar="SRC",
        nargs="+",
        help="a shard set (holds manifest.json), a DeepSpeed save folder (holds latest) or tag folder, a DCP "
        "folder (holds .metadata), or a Trainer / accelerate checkpoint-N/ folder holding one of them; several "
        "shard folders for a set written to node-local disks (one per node, copied back)",
    )
    parser.add_argument("-o", "--output", help="adapter directory to write (default: next to SRC, SRC-merged)")
    parser.add_argument(
        "--adapter-config",
        help="checkpoints: adapter_config.json, or a folder of adapters as PEFT saves them (default: found in SRC "
        "or its parent)",
    )
    parser.add_argument(
        "--base",
        help="checkpoints: the base model's folder (its config.json) or a Hub id in the local cache (default: "
        "the adapter config's base_model_name_or_path); its structure is built without weights",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="checkpoints: dtype of the written tensors (auto: what the model trained in)",
    )
    parser.add_argument(
        "--into",
        metavar="BASE",
        help="merge the adapter into this base model (a local Hugging Face folder) and write the merged full "
        "weights, as PEFT's merge_and_unload().save_pretrained(OUT) would; SRC may then be an adapter folder too",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="--into: the largest weights file (as save_pretrained's, default 5GB)"
    )
    parser.add_argument(
        "--selected-adapters",
        nargs="+",
        metavar="NAME",
        help="--into: adapters of a folder saved with several, merged together in this order (default: the root one)",
    )
    parser.add_argument("--tag", help="DeepSpeed: the tag to read (default: the one `latest` names)")
    parser.add_argument("--initial-adapter", help="initial PiSSA/CorDA/OLoRA adapter, to convert to plain LoRA")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read an initial adapter saved as adapter_model.bin (with torch.load(weights_only=True)); DeepSpeed: "
        "load checkpoint files that refer to types outside the allowlist (only for files you trust)",
    )
    parser.add_argument("--bin", action="store_true", help="write adapter_model.bin instead of .safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    args = parser.parse_args(argv)
    if args.into is not None:
        return _main_into(args)
    try:
        from shardsave.rescue.checkpoint import detect_source, rescue_adapter

        sources = [detect_source(s, tag=args.tag) for s in args.shards]
        source = sources[0]
        if len(sources) > 1 and any(s.kind != "shards" for s in sources):
            raise ShardSetError(
                "several SRC folders are for a shard set written to node-local disks; pass one checkpoint."
            )
        if source.kind == "shards":
            for option in ("adapter_config", "base", "tag"):
                if getattr(args, option) is not None:
                    raise ShardSetError(f"--{option.replace('_', '-')} applies to framework checkpoints, not shards.")
            out = merge_shards(
                [s.given for s in sources],
                args.output,
                safe_serialization=not args.bin,
                path_initial_model_for_weight_conversion=args.initial_adapter,
                allow_pickle=args.allow_pickle,
                overwrite=args.overwrite,
                progress=False if args.no_progress else None,
            )
        else:
            if args.initial_adapter is not None:
                raise ShardSetError("--initial-adapter converts shard sets; rescue the adapter first, then convert.")
            _import_for_rescue()
            try:
                out = rescue_adapter(
                    source.given,
                    args.output if args.output is not None else default_output(source.given),
                    adapter_config=args.adapter_config,
                    base=args.base,
                    dtype=args.dtype,
                    tag=args.tag,
                    safe_serialization=not args.bin,
                    allow_pickle=args.allow_pickle,
                    overwrite=args.overwrite,
                )
            finally:
                gc.unfreeze()  # the interpreter's exit frees them as usual
    except (ValueError, NotImplementedError) as exc:  # ShardSetError, RescueError, or a bad output path
        print(f"shardsave.merge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, disk full: publish left the output as it was
        print(f"shardsave.merge: error: writing the adapter failed ({type(exc).__name__}: {exc}); nothing was "
              f"published and the output directory is unchanged.", file=sys.stderr)  # fmt: skip
        return 1
    print(f"shardsave.merge: read {source.describe()} from {source.given}; wrote the adapter to {out}")
    return 0


def _main_into(args: argparse.Namespace) -> int:
    """`--into BASE`: the merged full weights (`shardsave.merged.offline.merge_into`)."""
    from shardsave.merged.offline import merge_into

    try:
        for option in ("adapter_config", "base", "tag", "initial_adapter"):
            if getattr(args, option) is not None:
                raise ShardSetError(f"--{option.replace('_', '-')} does not apply with --into.")
        if args.bin or len(args.shards) > 1 or args.output is None:
            raise ShardSetError("--into takes one SRC and needs -o OUT (and writes safetensors: no --bin).")
        _import_for_rescue()
        try:
            out = merge_into(
                args.shards[0],
                args.into,
                args.output,
                selected_adapters=args.selected_adapters,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                allow_pickle=args.allow_pickle,
                overwrite=args.overwrite,
            )
        finally:
            gc.unfreeze()
    except (ValueError, NotImplementedError) as exc:
        print(f"shardsave.merge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"shardsave.merge: error: writing the merged model failed ({type(exc).__name__}: {exc}); nothing was "
              f"published and {args.output} is unchanged.", file=sys.stderr)  # fmt: skip
        return 1
    print(f"shardsave.merge: merged {args.shards[0]} into {args.into}; wrote the merged model to {out}")
    return 0
