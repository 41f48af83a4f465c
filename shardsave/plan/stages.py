"""Ranks that hold different parts of the model (pipeline stages, alone or with FSDP / replicas inside each):
one plan from what every rank reports it holds. Pure functions over JSON-able metadata, no tensors.

Each rank describes its own part as a `view`: for each tensor it holds, the full shape and dtype and the element
runs it holds (with a fingerprint of each), and the checkpoint entries its own modules give. `union_views` turns
the views of all ranks into one plan that every rank then follows: every tensor's runs, each with the ranks that
hold a copy, and each adapter's entries in the model's order. Nothing is guessed: a tensor that two ranks
describe differently, runs that overlap without being equal or leave elements uncovered, copies whose bytes
differ, or a checkpoint key taken from two different tensors are refused with what was found.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence

from shardsave.errors import StageError

__all__ = ["StageError", "union_views", "merge_orders", "sender_of", "pack_union", "unpack_union"]


def _natural(name: str) -> tuple:
    """A sort key that orders `layers.10` after `layers.9` (the order modules are numbered in)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def merge_orders(sequences: Sequence[Sequence[str]]) -> list[str]:
    """One order of all names that keeps the order within every sequence (each rank lists its names in the
    model's state-dict order); where the sequences leave the order open (interleaved stages, say layers 0-1 and
    4-5 on one rank, 2-3 on another), the naturally smaller name comes first. Pure and deterministic."""
    after: dict[str, set[str]] = {}
    before: dict[str, int] = {}
    for seq in sequences:
        for name in seq:
            after.setdefault(name, set())
            before.setdefault(name, 0)
        for a, b in zip(seq, seq[1:], strict=False):
            if a != b and b not in after[a]:
                after[a].add(b)
                before[b] += 1
    ready = sorted((n for n, count in before.items() if count == 0), key=_natural)
    out: list[str] = []
    while ready:
        name = ready.pop(0)
        out.append(name)
        for nxt in after[name]:
            before[nxt] -= 1
            if before[nxt] == 0:
                ready.append(nxt)
        ready.sort(key=_natural)
    if len(out) != len(before):  # two ranks list the same names in opposite orders
        stuck = sorted(set(before) - set(out), key=_natural)[:4]
        raise StageError(f"the ranks list tensors {stuck} in contradicting orders: their models are not parts of one.")
    return out


def sender_of(name: str, holders: Sequence[int], dst: int | None = None) -> int:
    """Which of the ranks holding copies of a run sends it: `dst` itself when it holds one (read in place), else
    one picked by the tensor's name, so that different tensors spread over different replicas."""
    if dst is not None and dst in holders:
        return dst
    ordered = sorted(holders)
    return ordered[zlib.crc32(name.encode()) % len(ordered)]


def _runs_of(name: str, numel: int, reported: Mapping[int, Sequence[Sequence]]) -> list[list]:
    """`[start, stop, [ranks]]` of every distinct run of one tensor; refuses overlaps, gaps and copies that differ."""
    runs: dict[tuple[int, int], dict[int, str]] = {}
    for rank, held in reported.items():
        for start, stop, fingerprint in held:
            if stop > start:
                runs.setdefault((int(start), int(stop)), {})[rank] = fingerprint
    out, position = [], 0
    for (start, stop), copies in sorted(runs.items()):
        if start != position:
            problem = f"leaves [{position}, {start}) on no rank" if start > position else "overlaps the run before it"
            raise StageError(
                f"{name}: the runs the ranks hold ({sorted(runs)[:6]}) do not tile its {numel} elements: run "
                f"[{start}, {stop}) on ranks {sorted(copies)} {problem}. Every element must be held by some rank, in "
                f"runs that are equal wherever ranks hold copies."
            )
        if len(set(copies.values())) > 1:
            raise StageError(
                f"{name}: elements [{start}, {stop}) differ between the ranks that hold copies of them "
                f"({sorted(copies)}). Either the copies drifted apart during training (replicas not kept in sync), "
                f"or different tensors share this name: pipeline stages that renumber their modules (a new "
                f"ModuleList per stage) save one stage over another. Keep the full model's module names on every "
                f"stage (replace the other stages' layers, do not rebuild the list)."
            )
        out.append([start, stop, sorted(copies)])
        position = stop
    if position != numel:
        raise StageError(
            f"{name}: elements [{position}, {numel}) are held by no rank (runs {sorted(runs)[:6]}). A stage that holds "
            f"part of this tensor is missing, or the ranks disagree on its size."
        )
    return out


def union_views(views: Mapping[int, Mapping]) -> dict:
    """One plan from every rank's `view` (rank -> `{"tensors": {name: [shape, dtype, requires_grad, [[start,
    stop, fingerprint], ...]]}, "entries": {adapter: {option: [[key, name], ...]}}}`).

    Returns `{"tensors": {name: [shape, dtype, requires_grad]}, "runs": {name: [[start, stop, [ranks]], ...]},
    "entries": {adapter: {option: [[key, name], ...]}}}`, tensors and entries in the model's order. Raises
    `StageError` where the parts do not add up (see the module docstring)."""
    described: dict[str, tuple[int, list, str, bool]] = {}
    reported: dict[str, dict[int, list]] = {}
    for rank, view in sorted(views.items()):
        for name, (shape, dtype, requires_grad, held) in view["tensors"].items():
            mine = (list(shape), dtype, bool(requires_grad))
            first = described.setdefault(name, (rank, *mine))
            if tuple(first[1:]) != mine:
                raise StageError(
                    f"{name} is {first[1]} {first[2]} on rank {first[0]} but {mine[0]} {mine[1]} on rank {rank}: the "
                    f"ranks' models differ where they overlap. Build every stage from one model and adapter config."
                )
            reported.setdefault(name, {})[rank] = held
    order = merge_orders([list(view["tensors"]) for _, view in sorted(views.items())])
    tensors, runs = {}, {}
    for name in order:
        _, shape, dtype, requires_grad = described[name]
        numel = 1
        for size in shape:
            numel *= size
        tensors[name] = [shape, dtype, requires_grad]
        runs[name] = _runs_of(name, numel, reported[name])
    return {"tensors": tensors, "runs": runs, "entries": _union_entries(views)}


def _union_entries(views: Mapping[int, Mapping]) -> dict:
    adapters: dict[str, dict[str, list[list[str]]]] = {}
    for rank, view in sorted(views.items()):
        for adapter, options in view["entries"].items():
            for option, pairs in options.items():
                adapters.setdefault(adapter, {}).setdefault(option, []).append([rank, pairs])
    out: dict[str, dict[str, list]] = {}
    for adapter, options in adapters.items():
        out[adapter] = {}
        for option, lists in options.items():
            source: dict[str, tuple[int, str]] = {}
            for rank, pairs in lists:
                for key, name in pairs:
                    seen = source.setdefault(key, (rank, name))
                    if seen[1] != name:
                        raise StageError(
                            f"adapter {adapter!r}: checkpoint key {key} is {seen[1]} on rank {seen[0]} but "
                            f"{name} on rank {rank}; the ranks' models are not parts of one."
                        )
            keys = merge_orders([[key for key, _ in pairs] for _, pairs in lists])
            out[adapter][option] = [[key, source[key][1]] for key in keys]
    return out


def pack_union(union: Mapping) -> dict:
    """`union` as every rank reads it from the store: each distinct list of holders once (the data-parallel ranks
    of a stage hold every one of its tensors: listed once, not once per run), runs naming theirs by position; an
    adapter's entries for one option that equal those of the option before it, as that option's name (without
    an embedding layer to decide on, both embeddings options give the same entries)."""
    lists: dict[tuple[int, ...], int] = {}
    runs = {
        name: [[a, b, lists.setdefault(tuple(holders), len(lists))] for a, b, holders in held]
        for name, held in union["runs"].items()
    }
    entries = {}
    for adapter, options in union["entries"].items():
        entries[adapter], previous = {}, None
        for option, pairs in options.items():
            same = previous is not None and options[previous] == pairs
            entries[adapter][option] = previous if same else pairs
            previous = previous if same else option
    return {**union, "runs": runs, "holders": [list(h) for h in lists], "entries": entries}


def unpack_union(packed: Mapping) -> dict:
    """`pack_union`'s inverse."""
    lists = packed["holders"]
    runs = {name: [[a, b, lists[i]] for a, b, i in held] for name, held in packed["runs"].items()}
    entries = {
        adapter: {option: options[pairs] if isinstance(pairs, str) else pairs for option, pairs in options.items()}
        for adapter, options in packed["entries"].items()
    }
    return {k: v for k, v in packed.items() if k != "holders"} | {"runs": runs, "entries": entries}
