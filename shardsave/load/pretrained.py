"""Load a saved adapter into a model wherever its ranks hold it: `shardsave.load_pretrained`.

Every rank already knows, from metadata alone, which element range of each tensor it holds (the collectors' `own`,
the same plan the save gathers with), and the files say where each saved element lies (safetensors offsets, or a
shard set's runs: `shardsave.formats.adapter`). So each rank reads exactly its own elements, with no tensor
collective, whatever world size and backend saved the adapter: resharding N -> M is an intersection of ranges
(`shardsave.plan.ranges.read_items`). Everything is checked and read on every rank before any parameter is written,
and the ranks agree through the store as a save does (`shardsave.ranks.handshake.agree_on_plan`): on any error every
rank raises and the model is as it was. DeepSpeed's fp32 master weights are written too (ZeRO-1/2/3, and the stage-0
fp16/bf16 optimizers' own fp32 copies), so that the next `engine.step()` continues from the loaded weights rather
than bringing the old ones back. A ZeRO-3 engine without an optimizer (evaluating adapters) has no masters: its
partitions alone are written. A ZeRO-3 parameter that is gathered at the time (persistent, inside
`GatheredParameters`, kept by the prefetcher) gets its full copy written too, so that a forward before the release,
or a `GatheredParameters` exit that re-partitions from the full copy, sees the loaded values; one whose gather is in
flight, or whose partition lives on NVMe (the memory holds a placeholder or a swap buffer), is refused before
anything is written.

What each rank writes where, with DeepSpeed's masters and the ZeRO-3 refusals, is `shardsave.load.writes`.

A shard set is verified once, by rank 0 (manifest, headers, coverage, checksums), which hands the others an index
of which file holds which run; each rank then opens only the files holding its ranges, each proven to be the file
rank 0 verified (same size and mtime, else its own checksum against the manifest) before it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from shardsave.errors import AdapterMismatchError
from shardsave.formats.adapter import AdapterFiles, is_shard_set, open_adapter, open_indexed, shard_index
from shardsave.load.writes import Fp32Copies, Write, apply_writes, check_masters, writes_of
from shardsave.log import logger
from shardsave.plan.cache import PlanCache
from shardsave.plan.keys import plan_choices
from shardsave.plan.structure import build_layout, find_peft_model, peel
from shardsave.ranks.collect import collector_for
from shardsave.ranks.collect.walk import state_entries
from shardsave.ranks.handshake import Request, agree_on_plan
from shardsave.ranks.identity import Ranks, resolve_timeout
from shardsave.ranks.rendezvous import Rendezvous, check_same_args

__all__ = ["LoadResult", "AdapterMismatchError", "CONFIG_FIELDS", "compare_configs", "load_pretrained"]

#: Adapter-config fields that decide which tensors an adapter has or what they do: loading weights saved under
#: another value of any of them would run silently wrong.
CONFIG_FIELDS = (
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "target_modules",
    "exclude_modules",
    "target_parameters",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "trainable_token_indices",
    "bias",
    "lora_bias",
    "fan_in_fan_out",
    "layer_replication",
)


class LoadResult(NamedTuple):
    """What PEFT's `set_peft_model_state_dict` reports: the model's state-dict entries that were not loaded, and
    the saved keys that fit no entry."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _normal(value: object) -> object:
    """A config value as compared: enums by value, collections of names as sorted lists, empties as None."""
    value = getattr(value, "value", value)
    if isinstance(value, set | frozenset | list | tuple):
        items = [_normal(v) for v in value]
        value = sorted(items, key=repr) if all(isinstance(v, str) for v in items) else items
    elif isinstance(value, dict):
        value = {str(k): _normal(v) for k, v in sorted(value.items())}
    return None if value in ([], {}, "") else value


def compare_configs(saved: Mapping, live: Mapping) -> list[str]:
    """Each field of `CONFIG_FIELDS` on which the saved adapter config and the model's differ, as
    `field: saved X, model Y` (a pure function; `live` may come from `PeftConfig.to_dict()`)."""
    out = []
    for name in CONFIG_FIELDS:
        a, b = _normal(saved.get(name)), _normal(live.get(name))
        if a != b:
            out.append(f"{name}: saved {a!r}, model {b!r}")
    return out


@dataclass(slots=True)
class _Prepared(Request):
    """What a rank plans to load, checked and read before the agreement (`shardsave.ranks.handshake`)."""

    args: dict
    writes: list[Write]
    result: LoadResult
    path: str

    def status(self) -> dict:
        return {"args": self.args, "unexpected": self.result.unexpected_keys, "path": self.path}


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a load plans from the model's structure alone; reused while the structure is unchanged (an
    evaluation loop that loads adapter after adapter pays the module walks once)."""

    collector: object
    known: dict[str, str]  # checkpoint key -> state-dict name, embedding layers included
    required: dict[str, str]  # the same without the embedding layers (which a save may leave out)
    params: dict[str, nn.Parameter]


_PLANS: PlanCache[_Plan] = PlanCache()


def _plan(root: nn.Module, peft_model, ranks: Ranks, adapter_name: str) -> _Plan:
    collector = collector_for(root, ranks)
    names = list(collector.infos())
    choices = plan_choices(build_layout(peft_model), peft_model, names, [adapter_name], "auto")[adapter_name]
    params = {name: t for name, t, is_param in state_entries(root) if is_param}
    return _Plan(collector, choices[True].entries, choices[False].entries, params)


def _preview(keys: list[str], most: int = 5) -> str:
    return f"{keys[:most]}{f' and {len(keys) - most} more' if len(keys) > most else ''}"


def _prepare(model: nn.Module, files: AdapterFiles, adapter_name: str, strict: bool, ranks: Ranks) -> _Prepared:
    peft_model = find_peft_model(model)
    if adapter_name not in peft_model.peft_config:
        raise AdapterMismatchError(
            f"The model has no adapter {adapter_name!r} (it has {list(peft_model.peft_config)}); load_pretrained "
            f"loads into an existing adapter: add it first (peft_model.add_adapter(name, config)) or pass adapter_name."
        )
    root = peel(model)
    _reshard(root)
    config = peft_model.peft_config[adapter_name].to_dict()
    key = (ranks, id(peft_model), adapter_name, json.dumps(config, sort_keys=True, default=str))
    plan = _PLANS.get(root, key, lambda: _plan(root, peft_model, ranks, adapter_name))
    collector, known, required, params = plan.collector, plan.known, plan.required, plan.params
    problems = compare_configs(files.config, config)
    if problems:
        raise AdapterMismatchError(
            f"{files.path}: its adapter config does not match the model's adapter {adapter_name!r}: "
            + "; ".join(problems)
            + ". Build the model's adapter with the config the adapter was saved with."
        )
    infos = collector.infos()
    unexpected = [k for k in files.specs if k not in known]
    missing = [k for k in required if k not in files.specs]
    # a key no tensor of this rank takes may be another rank's (pipeline stages): decided by all ranks together
    if strict and (missing or (unexpected and not ranks.distributed)):
        raise _keys_error(files.path, adapter_name, missing, unexpected)
    loaded = {k: known[k] for k in files.specs if k in known}
    for key, source in loaded.items():
        spec, info = files.specs[key], infos[source]
        if spec.shape != info.shape:
            raise AdapterMismatchError(
                f"{files.path}: {key} is {list(spec.shape)}, but the model's {source} is {list(info.shape)}."
            )
        if spec.dtype.is_floating_point != info.dtype.is_floating_point:
            raise AdapterMismatchError(
                f"{files.path}: {key} is saved as {spec.dtype}; the model's {source} is {info.dtype}, and one is "
                f"not a floating-point type: converting would change its values."
            )
    writes, seen = [], set()
    copies = Fp32Copies(model, root)
    for key, source in loaded.items():
        name = collector.primary(source)
        if name not in seen:  # tied names: written once
            seen.add(name)
            writes += writes_of(collector, name, params.get(name), files, key, copies)
    # what was planned and what the files hold (not the path: a node may keep its copy elsewhere)
    # (which keys each rank loads is its own: ranks holding different parts of the model load different keys)
    specs = [[k, list(v.shape), str(v.dtype)] for k, v in files.specs.items()]
    plan = json.dumps([specs, files.config], sort_keys=True, default=str)
    args = {"adapter_name": adapter_name, "strict": strict, "plan": hashlib.sha256(plan.encode()).hexdigest()[:16]}
    taken = set(loaded.values())
    live = [n for n in infos if n not in taken]
    return _Prepared(args, writes, LoadResult(live, unexpected), str(files.path))


def _keys_error(path, adapter_name: str, missing: list[str], unexpected: list[str]) -> AdapterMismatchError:
    return AdapterMismatchError(
        f"{path}: does not hold the tensors of the model's adapter {adapter_name!r}: "
        + (f"missing {_preview(missing)}" if missing else "")
        + ("; " if missing and unexpected else "")
        + (f"unexpected {_preview(unexpected)}" if unexpected else "")
        + ". Pass strict=False to load what fits."
    )


def _reshard(root: nn.Module) -> None:
    """FSDP2 leaves the root's parameters gathered after a forward (`reshard_after_forward` is off for the root):
    the module then holds full copies that the next backward replaces with the shards. Written there, a load
    would be undone at the first step, so every FSDP2 module is put back to its shards first (local, no
    collective)."""
    from torch.distributed.fsdp import FSDPModule

    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _verify_once(rdv: Rendezvous, path, adapter_name: str, allow_pickle: bool) -> AdapterFiles | dict | None:
    """A distributed load of a shard set: rank 0 opens and verifies it (headers, coverage, checksums) and hands
    the others its index (`shard_index`); every rank must see a shard set at `path` or none does. Returns rank
    0's opened files, the index on the others, or `None` (not a shard set: each rank opens `path` itself)."""
    rank0 = rdv.ranks.rank == 0
    error, seen, files = None, False, None
    try:
        seen = is_shard_set(path)
        if seen and rank0:
            files = open_adapter(path, adapter_name, allow_pickle=allow_pickle)
    except Exception as exc:  # every rank raises it, or RemoteError naming rank 0
        error = exc

    def index(statuses: dict[int, dict]) -> dict | None:
        differ = sorted(r for r, st in statuses.items() if st["shards"] != statuses[0]["shards"])
        if differ:
            raise AdapterMismatchError(
                f"{os.fspath(path)}: rank 0 {'sees' if seen else 'does not see'} a shard set (manifest.json) there, "
                f"rank(s) {differ[:8]} {'do not' if seen else 'do'}: every rank must load the same saved adapter "
                f"(a shared filesystem, or the same copy on every node)."
            )
        return shard_index(files) if files is not None else None

    try:
        verdict = rdv.agree("source", {"shards": seen}, own=error, decide=index)
    except BaseException:
        if files is not None:
            files.close()
        raise
    return files if rank0 and files is not None else verdict


def _decide(statuses: dict[int, dict]) -> list[str]:
    """Rank 0's verdict: the same call on every rank; returns the saved keys that no rank's model takes (refused
    under `strict`). Ranks holding different parts of the model (pipeline stages) each take their own keys."""
    check_same_args(statuses, op="load_pretrained", plan_means="another saved adapter or adapter config")
    unexpected = statuses[0]["unexpected"]
    for status in statuses.values():
        theirs = set(status["unexpected"])
        unexpected = [k for k in unexpected if k in theirs]
    if unexpected and statuses[0]["args"]["strict"]:
        raise _keys_error(statuses[0]["path"], statuses[0]["args"]["adapter_name"], [], unexpected)
    return unexpected


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    strict: bool = True,
    timeout: float | None = None,
    allow_pickle: bool = False,
) -> LoadResult:
    """Load the adapter saved at `path` into the model's existing adapter `adapter_name`, in place, wherever each
    rank holds its parameters (one process, DDP, ZeRO-1/2/3, FSDP1, FSDP2). Call it on every rank.

    `path`: a PEFT adapter folder (PEFT's or shardsave's; `.bin` only with `allow_pickle`, then weights-only),
    the folder holding `adapter_name/`, or a shardsave shard set, saved under any world size and backend. Each
    rank reads only the elements it holds. Everything is checked before anything is written; on any problem
    every rank raises and the model is unchanged. `strict=False` loads what fits. Returns the model's entries
    not loaded and the saved keys that fit none, as PEFT's `set_peft_model_state_dict` does.
    """
    started = time.perf_counter()
    ranks = Ranks.current()
    rdv = Rendezvous(ranks, op="load_pretrained", timeout=resolve_timeout(timeout))
    index = _verify_once(rdv, path, adapter_name, allow_pickle) if ranks.distributed else None

    def prepare() -> _Prepared:
        files = None
        try:
            if isinstance(index, dict):
                files = open_indexed(path, index)
            else:
                files = index or open_adapter(path, adapter_name, allow_pickle=allow_pickle)
            prepared = _prepare(model, files, adapter_name, strict, ranks)
            check_masters(prepared.writes)
            return prepared
        finally:
            if files is not None:
                files.close()  # everything was read: the writes hold the values

    # the handshake's first step alone: every rank writes its own part (no writer, no replica to compare: each
    # copy is written), and ranks holding different parts take their own keys (`_decide`), with nothing to restage
    prepared, unexpected = agree_on_plan(
        rdv, prepare, phase="load", failed={"args": {}}, decide=_decide if ranks.distributed else None
    )
    if unexpected is not None:
        prepared.result.unexpected_keys[:] = unexpected
    rdv.forget_previous()
    error = None
    try:
        apply_writes(prepared.writes)
    except Exception as exc:  # not expected (copies into existing storage): still agreed on, never hidden
        error = exc
    rdv.agree("loaded", {}, own=error)
    nbytes = sum(w.value.numel() * w.value.element_size() for w in prepared.writes)
    logger.info(
        "loaded adapter %r from %s: %d tensors, %.2f MiB on this rank, in %.2f s", adapter_name, os.fspath(path),
        len(prepared.writes), nbytes / 2**20, time.perf_counter() - started,
    )  # fmt: skip
    return prepared.result
