"""Load a saved adapter into a model wherever its ranks hold it: `shardsave.load_pretrained`.

Every rank already knows, from metadata alone, which element range of each tensor it holds (the collectors'
`own`, the same plan the save gathers with), and the files say where each saved element lies (safetensors
offsets, or a shard set's runs: `shardsave.adapter_files`). So each rank reads exactly its own elements, with
no tensor collective, whatever world size and backend saved the adapter: resharding N -> M is an intersection
of ranges (`shardsave.plan.read_items`). Everything is checked and read on every rank before any parameter
is written, and the ranks agree through the store as a save does: on any error every rank raises and the model
is as it was. DeepSpeed's fp32 master weights are written too, so that the next `engine.step()` continues from
the loaded weights rather than bringing the old ones back.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .adapter_files import open_adapter
from .collect import collector_for
from .collect.walk import state_entries
from .layout import build_layout, find_peft_model, peel
from .log import logger
from .ranks import Ranks, Rendezvous, check_same_args, resolve_timeout
from .reuse import PlanCache
from .select import plan_choices

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


class AdapterMismatchError(ValueError):
    """The saved adapter does not fit the model's adapter (config, keys, shapes or dtypes)."""


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
class _Write:
    name: str  # canonical state-dict name (the primary of tied names)
    target: torch.Tensor  # 1-D view of this rank's elements [start, stop) of the live tensor
    value: torch.Tensor  # what goes there, already in the target's dtype
    param: nn.Parameter | None
    start: int
    master: torch.Tensor | None = None  # the fp32 values of DeepSpeed's master partition, when it has one


@dataclass(slots=True)
class _Prepared:
    args: dict
    writes: list[_Write]
    result: LoadResult
    path: str


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


def _prepare(model: nn.Module, path, adapter_name: str, strict: bool, allow_pickle: bool, ranks: Ranks) -> _Prepared:
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
    files = open_adapter(path, adapter_name, allow_pickle=allow_pickle)
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
    for key, source in loaded.items():
        name = collector.primary(source)
        if name not in seen:  # tied names: written once
            seen.add(name)
            writes += _writes_of(collector, name, params.get(name), files, key)
    # what was planned and what the files hold (not the path: a node may keep its copy elsewhere)
    # (which keys each rank loads is its own: ranks holding different parts of the model load different keys)
    specs = [[k, list(v.shape), str(v.dtype)] for k, v in files.specs.items()]
    plan = json.dumps([specs, files.config], sort_keys=True, default=str)
    args = {"adapter_name": adapter_name, "strict": strict, "plan": hashlib.sha256(plan.encode()).hexdigest()[:16]}
    live = [n for n in infos if n not in set(loaded.values())]
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


def _writes_of(collector, name: str, param, files, key: str) -> list[_Write]:
    """This rank's writes of one tensor: its own range, or the whole tensor where every rank holds it whole; with
    the fp32 master copy DeepSpeed keeps of it."""
    if param is not None and hasattr(param, "ds_id") and hasattr(param, "ds_tensor"):
        return _zero3_writes(collector, name, param, files, key)
    if collector.slices(name) is None:
        whole = collector.whole(name).detach().view(-1)
        raw = files.read(key, 0, whole.numel())
        write = _Write(name, whole, raw.to(whole.dtype), param, 0)
        if param is not None and getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2, bf16 optimizer
            write.master = raw.float()
        return [write]
    writes = []
    for run in collector.own(name):  # every run this rank holds (none: nothing to write here)
        target = collector.local(name, run).detach()
        writes.append(_Write(name, target, files.read(key, run.start, run.stop).to(target.dtype), param, run.start))
    return writes


def _zero3_writes(collector, name: str, param, files, key: str) -> list[_Write]:
    """ZeRO-3: the rank's partition `ds_tensor` (member k of its partition group holds `[k*P, (k+1)*P)`,
    zero-padded at the end) with the optimizer's fp32 copy of it; and the full tensor too where the parameter
    is kept gathered (persistent, below `stage3_param_persistence_threshold`)."""
    numel = int(param.ds_numel)
    start, stop = collector.partition(name)
    local = param.ds_tensor.detach().view(-1)
    raw = files.read(key, start, stop)
    if stop - start == local.numel():  # no padding: an fp32 read is the master itself (no second buffer)
        master = raw.float()
    else:
        master = torch.zeros(local.numel(), dtype=torch.float32)
        master[: stop - start] = raw.float()
    writes = [_Write(name, local[: stop - start], raw.to(local.dtype), param, start, master)]
    if collector.slices(name) is None and param.data.numel() == numel:  # persistent: gathered on every rank
        whole = param.data.detach().view(-1)
        writes.append(_Write(name, whole, files.read(key, 0, numel).to(whole.dtype), None, 0))
    return writes


def _check_masters(writes: list[_Write]) -> None:
    """The DeepSpeed calls that write the fp32 masters exist (checked before any parameter is written)."""
    if any(w.master is not None for w in writes) and "deepspeed" not in sys.modules:
        raise RuntimeError("DeepSpeed parameters without deepspeed imported: cannot update their fp32 master weights.")


def _apply(writes: list[_Write]) -> None:
    with torch.no_grad():
        for w in writes:
            w.target.copy_(w.value.view(-1))
            if getattr(w.param, "ds_secondary_tensor", None) is not None:
                # ZeRO++ hpZ: a copy of the partition cut for the node, which the next gather would read
                # instead of the partition just written; DeepSpeed rebuilds it from the partition after a step
                w.param.ds_secondary_tensor = None
        masters = [w for w in writes if w.master is not None]
        if masters:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

            for w in masters:
                if hasattr(w.param, "ds_id"):
                    safe_set_local_fp32_param(w.param, w.master)
                else:
                    safe_set_full_fp32_param(w.param, w.master.view(w.param.shape))


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
    prepared, error = None, None
    try:
        prepared = _prepare(model, path, adapter_name, strict, allow_pickle, ranks)
        _check_masters(prepared.writes)
    except Exception as exc:  # every rank learns of it below, then raises
        error = exc
    payload = {"args": {}} if prepared is None else {
        "args": prepared.args, "unexpected": prepared.result.unexpected_keys, "path": prepared.path
    }  # fmt: skip
    unexpected = rdv.agree("load", payload, own=error, decide=_decide if ranks.distributed else None)
    if unexpected is not None:
        prepared.result.unexpected_keys[:] = unexpected
    rdv.forget_previous()
    error = None
    try:
        _apply(prepared.writes)
    except Exception as exc:  # not expected (copies into existing storage): still agreed on, never hidden
        error = exc
    rdv.agree("loaded", {}, own=error)
    nbytes = sum(w.value.numel() * w.value.element_size() for w in prepared.writes)
    logger.info(
        "loaded adapter %r from %s: %d tensors, %.2f MiB on this rank, in %.2f s", adapter_name, os.fspath(path),
        len(prepared.writes), nbytes / 2**20, time.perf_counter() - started,
    )  # fmt: skip
    return prepared.result
