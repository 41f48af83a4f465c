"""Tensors that every rank holds whole (DDP, ZeRO-1/2, buffers) must be the same on every rank: `save_shards`
writes each from one rank only, so copies that drifted apart (ranks not in sync) would be mixed into an
adapter that no rank ever had. Each rank fingerprints its copies where they are (no device-to-host copy),
and rank 0 compares before it vouches for the set.

What goes through the store stays small at any number of ranks: each rank posts one digest per replica group (the
ranks that hold the same runs as it does, from metadata) instead of a fingerprint per run. Rank 0 compares the
digests of each group (`to_ask`); only where they differ does it ask, in a second round, one rank per distinct
digest for its fingerprints of that group, to name the tensor that differs (`refuse_drift`, the one refusal).
The two rounds run in `shardsave.ranks.handshake` (`replicas_to_check`, `compare_replicas`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Hashable, Mapping, Sequence
from typing import NoReturn, TypeVar

import torch

from shardsave.errors import SaveError

__all__ = [
    "fingerprints",
    "diverging",
    "held_prints",
    "group_id",
    "digests",
    "to_ask",
    "members",
    "refuse_drift",
    "ALL_RANKS",
]

#: The replica group of tensors that every rank holds whole.
ALL_RANKS = "all"
K = TypeVar("K", bound=Hashable)

_CHUNK = 1 << 22  # elements per step: bounds the temporaries of the weighted sum


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as 1-D integers (the widest integer type its byte count allows)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    for dtype in (torch.int64, torch.int32, torch.int16):
        if raw.numel() % dtype.itemsize == 0:
            return raw.view(dtype)
    return raw


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """(sum of words, position-weighted sum of words), in int64 arithmetic: exact and independent of the
    order of the reduction, so equal bytes give equal values on every rank; any single changed word changes
    them, and a reordering does but for contrived values."""
    words = _words(t)
    total = torch.zeros(2, dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start : start + _CHUNK].to(torch.int64)
        weights = torch.arange(start, start + chunk.numel(), device=chunk.device, dtype=torch.int64) * 2 + 1
        total[0] += chunk.sum()
        total[1] += (chunk * weights).sum()
    return total


def fingerprints(tensors: Mapping[K, torch.Tensor]) -> dict[K, str]:
    """A short fingerprint of each tensor's bytes (one synchronisation for all of them)."""
    by_device: dict[torch.device, list[K]] = {}
    for name, t in tensors.items():
        by_device.setdefault(t.device, []).append(name)
    out = {}
    for names in by_device.values():
        values = torch.stack([_fingerprint(tensors[n]) for n in names]).cpu().tolist()
        for name, (a, b) in zip(names, values, strict=True):
            out[name] = f"{a & (2**64 - 1):016x}{b & (2**64 - 1):016x}"
    return {name: out[name] for name in tensors}


def diverging(by_rank: Mapping[int, Mapping[str, str]]) -> list[str]:
    """Names whose fingerprint is not the same on every rank that reported it."""
    names: dict[str, set[str]] = {}
    for prints in by_rank.values():
        for name, value in prints.items():
            names.setdefault(name, set()).add(value)
    return sorted(name for name, values in names.items() if len(values) > 1)


@functools.lru_cache(maxsize=1024)
def group_id(holders: tuple[int, ...]) -> str:
    """A short id of a replica group (the same on every member): ranks that report it are its members."""
    return hashlib.sha256(",".join(map(str, holders)).encode()).hexdigest()[:16]


def held_prints(collector, names, rank: int) -> dict[str, dict[str, str]]:
    """Fingerprints of the runs this rank holds of sharded tensors that other ranks hold too (HSDP's replicate
    dimension, a parameter on a data-parallel sub-mesh, ZeRO-3 partition groups smaller than the world), as
    `name@start`, by replica group (`group_id` of the ranks holding the same runs, `collector.holders`): only one
    copy of each run is gathered or written, so copies that drifted apart must be found before, not mixed
    silently. Ranks reporting the same key hold the same run."""
    runs: dict[str, dict[str, torch.Tensor]] = {}
    for name in dict.fromkeys(collector.primary(n) for n in names):
        if collector.slices(name) is not None and collector.replicated(name):
            for run in collector.own(name):
                group = group_id(collector.holders(name, run))
                runs.setdefault(group, {})[f"{name}@{run.start}"] = collector.local(name, run)
    flat = fingerprints({(group, key): t for group, held in runs.items() for key, t in held.items()})
    out: dict[str, dict[str, str]] = {}
    for (group, key), value in flat.items():
        out.setdefault(group, {})[key] = value
    return out


def digests(grouped: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """One short digest of each group's fingerprints (`held_prints`): what a rank posts."""
    out = {}
    for group, prints in grouped.items():
        text = "\n".join(f"{key}={value}" for key, value in sorted(prints.items()))
        out[group] = hashlib.sha256(text.encode()).hexdigest()[:32]
    return out


def to_ask(by_rank: Mapping[int, Mapping[str, str]]) -> dict[int, list[str]]:
    """Rank 0's check of every rank's `digests`: for each group whose members posted different digests, one rank
    per distinct digest (the lowest), with the groups to send the fingerprints of. Empty when every group agrees
    (then nothing more is asked)."""
    seen: dict[str, dict[str, int]] = {}
    for rank, posted in sorted(by_rank.items()):
        for group, digest in posted.items():
            seen.setdefault(group, {}).setdefault(digest, rank)
    ask: dict[int, list[str]] = {}
    for group, first in sorted(seen.items()):
        if len(first) > 1:
            for rank in first.values():
                ask.setdefault(rank, []).append(group)
    return ask


def members(by_rank: Mapping[int, Mapping[str, str]], groups: Sequence[str]) -> dict[str, list[int]]:
    """The ranks that posted a digest for each of `groups`: its members."""
    wanted = set(groups)
    out: dict[str, list[int]] = {g: [] for g in groups}
    for rank, posted in sorted(by_rank.items()):
        for group in wanted.intersection(posted):
            out[group].append(rank)
    return out


def refuse_drift(
    prints: Mapping[int, Mapping[str, Mapping[str, str]]], groups: Mapping[str, list[int]], *, written: bool = False
) -> NoReturn:
    """Rank 0's refusal of copies that drifted apart, from the fingerprints the ranks asked posted (by rank, by
    replica group; `groups`: each group's members), naming what differs. Two messages, as users know them: before
    anything moved (the start of every call: runs of sharded tensors, a `ValueError` that every rank raises, as for
    any disagreement of the ranks' inputs); and `written` (`save_shards`, once the files are written: the tensors
    every rank holds whole, a `SaveError`, which the other ranks raise as a `RemoteError` naming rank 0)."""
    by_rank = {rank: {k: v for p in grouped.values() for k, v in p.items()} for rank, grouped in prints.items()}
    differ = diverging(by_rank)
    if written:
        names = [set(p) for p in by_rank.values()]
        differ = differ or sorted(set.union(*names) - set.intersection(*names))  # (or: named differently)
        raise SaveError(
            f"shardsave.save_shards: {len(differ)} tensor(s) that every rank holds whole differ between ranks "
            f"(e.g. {differ[:3]}); the set would mix them, so no manifest was written. The ranks' copies are "
            f"out of sync (gradients not all-reduced, or weights changed on some ranks only): save from a "
            f"synchronised model, or use shardsave.save_pretrained, which writes the main process's copy."
        )
    if not differ:  # the members hold the same runs by their metadata but report other ones
        keys = {rank: sorted(p)[:4] for rank, p in by_rank.items() if p}
        raise ValueError(
            f"ranks {sorted(keys)} hold copies of the same runs of sharded tensors by their layout, but report "
            f"different runs ({keys}): the ranks' layouts disagree. Save from one model wrapped the same way on "
            f"every rank."
        )
    name, _, start = differ[0].rpartition("@")
    group = next(g for grouped in prints.values() for g, p in grouped.items() if differ[0] in p)
    raise ValueError(
        f"{len(differ)} run(s) of sharded tensors differ between the ranks that hold copies of them, e.g. "
        f"{name} from element {start} on ranks {groups[group]}: the copies drifted apart during training (e.g. a "
        f"LoRA tensor replicated across tensor-parallel ranks whose gradients are not all-reduced there), so "
        f"any one of them would be a silent choice. Keep replicas in sync (shard such tensors over that "
        f"dimension too), then save."
    )
