"""`python -m shardsave.verify PATH [--base BASE] [--json] [--allow-pickle]`: check a saved adapter for the silent
failures of distributed saves, and print what was found.

Argument parsing and printing over `shardsave.checks.verify.verify_adapter`. Without `--base` the check reads the
adapter's files alone (neither peft nor transformers is imported); `--base` builds PEFT's structure on the base
model, on the meta device.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from shardsave.checks.verify import Report, VerifyError, verify_adapter

__all__ = ["main"]


def _print_text(report: Report) -> None:
    for adapter in report.adapters:
        findings = [f for f in report.findings if f.adapter == adapter.name]
        where = Path(adapter.directory, adapter.file)
        state = "sound" if not findings else f"{len(findings)} problem(s)"
        print(f"{where}: adapter {adapter.name!r}, {adapter.tensors} tensors: {state}")
        for f in findings:
            print(f"  [{f.kind}] {f.key or '(adapter)'}: {f.message}")
    for note in report.notes:
        print(f"note: {note}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command; its exit status (0 sound, 1 problems found, 2 unreadable)."""
    parser = argparse.ArgumentParser(
        prog="python -m shardsave.verify",
        description="Check a saved PEFT adapter folder (and its subfolders for non-default adapters) for empty, "
        "sliced, all-zero, non-finite or misshapen tensors, keys PEFT would not load, and (with --base) tensors the "
        "base model needs. Reads one tensor at a time; nothing is written or downloaded.",
        epilog="Exit status: 0 sound; 1 problems found (each named with its key); 2 unreadable (no config, a "
        "truncated or corrupt file, a refused pickle, a base that cannot be found).",
    )
    parser.add_argument("path", help="the adapter folder (holds adapter_config.json)")
    parser.add_argument("--base", help="base model: a local folder with config.json, or a Hub id in the local cache")
    parser.add_argument("--json", action="store_true", help="print a machine-readable report on stdout")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read an adapter_model.bin (with torch.load(weights_only=True)); refused otherwise",
    )
    args = parser.parse_args(argv)
    try:
        report = verify_adapter(args.path, base=args.base, allow_pickle=args.allow_pickle)
    except VerifyError as exc:
        if args.json:
            print(json.dumps({"path": args.path, "base": args.base, "sound": False, "error": str(exc)}, indent=2))
        print(f"shardsave.verify: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_text(report)
    return 0 if report.sound else 1
