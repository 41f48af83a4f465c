"""`python -m shardsave.merge`: stitch a shard set, rescue an adapter from a framework checkpoint, or merge an
adapter into a base model's weights (`--into`).

    python -m shardsave.merge SHARDS_DIR [-o OUTPUT_DIR] [--bin] [--overwrite]
    python -m shardsave.merge CHECKPOINT [-o OUTPUT_DIR] [--adapter-config PATH] [--base BASE] [--dtype ...]
    python -m shardsave.merge SRC --into BASE -o OUT [--dtype ...] [--max-shard-size 5GB]

Argument parsing over the library calls (`shardsave.save.stitch.merge_shards`,
`shardsave.rescue.rescue_adapter`, `shardsave.merged.offline.merge_into`), with the errors reported in one
place. Each job imports what it needs when it runs: stitching a shard set and merging an adapter folder import
neither peft nor transformers (transformers only for a base its files do not describe, or a sharded output:
`shardsave.formats.hf_base`), nor does the rescue of a LoRA it can plan from metadata alone
(`shardsave.rescue.fast`); the other rescues build the model's structure with them.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from shardsave.errors import ShardSetError

__all__ = ["main"]


@dataclass(frozen=True, slots=True)
class _Job:
    """One of the command's jobs: what it writes (for the failure message) and how."""

    writes: str  # "the adapter", "the merged model"
    unchanged: Callable[[argparse.Namespace], str]  # what a failed write leaves unchanged
    run: Callable[[argparse.Namespace], str]  # does the job; the line printed on success


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _refuse(args: argparse.Namespace, options: Sequence[str], why: str) -> None:
    """`ShardSetError` naming the first of `options` that was given: it does not apply to this job."""
    for option in options:
        if getattr(args, option) is not None:
            raise ShardSetError(f"--{option.replace('_', '-')} {why}.")


@contextmanager
def _no_collection():
    """No garbage collection during a rescue (undone once the job is done: the interpreter's exit frees what it
    built as usual): a rescue that builds PEFT's skeleton creates peft's and transformers' many objects, and a
    full collection over them landed in the rescue (measured: ~250 ms of a ~400 ms rescue). Nothing is imported
    here: the rescue planned from metadata (`shardsave.rescue.fast`) imports neither peft nor transformers."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _adapter(args: argparse.Namespace) -> str:
    """SRC is a shard set (stitched) or a framework checkpoint (rescued): the adapter directory."""
    from shardsave.formats.sources import detect_source

    sources = [detect_source(s, tag=args.tag) for s in args.shards]
    source = sources[0]
    if len(sources) > 1 and any(s.kind != "shards" for s in sources):
        raise ShardSetError("several SRC folders are for a shard set written to node-local disks; pass one checkpoint.")
    if source.kind == "shards":
        from shardsave.save.stitch import merge_shards

        _refuse(args, ("adapter_config", "base", "tag"), "applies to framework checkpoints, not shards")
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
        from shardsave.rescue.checkpoint import rescue_adapter
        from shardsave.save.stitch import default_output

        if args.initial_adapter is not None:
            raise ShardSetError("--initial-adapter converts shard sets; rescue the adapter first, then convert.")
        with _no_collection():
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
    return f"read {source.describe()} from {source.given}; wrote the adapter to {out}"


def _into(args: argparse.Namespace) -> str:
    """`--into BASE`: the merged full weights (`shardsave.merged.offline.merge_into`). An adapter folder or a shard
    set is merged as it is; a framework checkpoint is rescued first (with peft and transformers only where the
    rescue needs PEFT's skeleton)."""
    from shardsave.errors import RescueError
    from shardsave.formats.sources import detect_source
    from shardsave.merged.offline import merge_into

    _refuse(args, ("adapter_config", "base", "tag", "initial_adapter"), "does not apply with --into")
    if args.bin or len(args.shards) > 1 or args.output is None:
        raise ShardSetError("--into takes one SRC and needs -o OUT (and writes safetensors: no --bin).")
    try:
        rescues = detect_source(args.shards[0]).kind != "shards"
    except (RescueError, OSError):
        rescues = False  # an adapter folder (or nothing usable: merge_into says what)
    with _no_collection() if rescues else nullcontext():
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
    return f"merged {args.shards[0]} into {args.into}; wrote the merged model to {out}"


_ADAPTER = _Job("the adapter", lambda args: "the output directory", _adapter)
_INTO = _Job("the merged model", lambda args: args.output, _into)


def main(argv: Sequence[str] | None = None) -> int:
    """The command; its exit status (0 written, 2 nothing acceptable to write, 1 writing failed)."""
    args = _parser().parse_args(argv)
    job = _INTO if args.into is not None else _ADAPTER
    try:
        done = job.run(args)
    except (ValueError, NotImplementedError) as exc:  # ShardSetError, RescueError, MergedError, a bad output path
        print(f"shardsave.merge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, disk full: publish left the output as it was
        print(f"shardsave.merge: error: writing {job.writes} failed ({type(exc).__name__}: {exc}); nothing was "
              f"published and {job.unchanged(args)} is unchanged.", file=sys.stderr)  # fmt: skip
        return 1
    print(f"shardsave.merge: {done}")
    return 0
