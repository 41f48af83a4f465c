"""Read chosen parameters' fp32 master weights out of a DeepSpeed ZeRO checkpoint, touching only their bytes.

`engine.save_checkpoint(dir)` writes `dir/latest` (the tag's name) and `dir/<tag>/` holding, per data-parallel
rank, `[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt` (the optimizer state, with that rank's partition of
the fp32 master weights) and the model states: `mp_rank_00_model_states.pt` (ZeRO-1/2) or
`zero_pp_rank_<r>_mp_rank_00_model_states.pt` (ZeRO-3). The model states' `param_shapes` lists, per parameter
group and in the order they were flattened, the name and shape of every parameter the optimizer holds; that is
all it takes to find a parameter in the flat partitions:

- ZeRO-1/2 (`single_partition_of_fp32_groups`): per group, the ranks' partitions (equal sizes) laid end to end
  are the group's flat vector: each parameter's `numel` elements, then its alignment padding
  (`param_alignment_paddings`, when saved), then padding at the end.
- ZeRO-3 (`fp32_flat_groups`): every parameter is split across the ranks, `ceil(numel / world)` elements each
  (the last padded); a rank's flat groups laid end to end are its pieces in `param_shapes` order.

Memory: the files are opened with `torch.load(mmap=True)`, so the frozen base model (its weights in
`module`, its `frozen_param_fragments`) and the optimizer's moments stay on disk; only the pickles' structure
is read, and the chosen parameters' elements are copied out of the mapped fp32 partitions.

Safety: the files are pickles. They are loaded with `weights_only=True` and an allowlist of the few DeepSpeed
types found in them (ZeRO stage enum, loss scaler, fragment address), each replaced by an inert stand-in
defined here, so no DeepSpeed code runs and DeepSpeed need not be installed. Anything else is refused with
its name (`allow_pickle=True` is the explicit escape, for files the user trusts).
"""

from __future__ import annotations

import bisect
import enum
import math
import os
import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardsave.errors import DeepSpeedCheckpointError, UnsafeCheckpointError
from shardsave.plan.names import canonical_name, path_component
from shardsave.storage.reads import read_text

__all__ = [
    "LATEST_NAME",
    "DeepSpeedCheckpointError",
    "UnsafeCheckpointError",
    "DeepSpeedTensor",
    "DeepSpeedCheckpoint",
    "checkpoint_dir",
    "read_checkpoint",
    "deepspeed_tensors",
    "read_tensors",
    "read_frozen",
]

#: The file in the save folder naming the most recent tag (written by `engine.save_checkpoint`).
LATEST_NAME = "latest"

#: A leading component put before every name by a wrapper that holds the model as `.module`; stripped only
#: when every name of the checkpoint has it, so a model's own top-level `module` child is kept.
WRAPPER_PREFIX = "module."


@dataclass(frozen=True, slots=True)
class DeepSpeedTensor:
    """A parameter held by the ZeRO optimizer, and where its fp32 master weights lie (from metadata alone)."""

    key: str  # as in `param_shapes` (the engine's module's parameter name)
    shape: tuple[int, ...]
    dtype: torch.dtype  # what the model trained it in (the master weights are fp32 whatever this is)
    group: int  # parameter group (ZeRO-1/2) or sub-group index of its first element (ZeRO-3)
    offset: int  # ZeRO-1/2: into the group's flat vector; ZeRO-3: into each rank's pieces laid end to end

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class DeepSpeedCheckpoint:
    """What one tag of a DeepSpeed checkpoint holds, read from its pickles' structure only."""

    folder: Path  # the tag's folder
    stage: int
    world_size: int
    tensors: dict[str, DeepSpeedTensor]  # canonical name -> the optimizer's parameters, in `param_shapes` order
    module_keys: dict[str, str]  # canonical name -> key in `module` (what the model-state file saved, frozen too)
    frozen: dict[str, DeepSpeedTensor]  # canonical name -> a parameter the optimizer does not hold (group -1)
    ds_version: str | None
    optim_files: tuple[Path, ...]  # per rank
    partitions: tuple[tuple[torch.Tensor, ...], ...]  # per rank, its flat fp32 groups, mapped (on disk until read)


# --- stand-ins for the DeepSpeed types in the pickles -----------------------------------------------------------


class _ZeroStage(enum.IntEnum):
    """Stand-in for `deepspeed.runtime.zero.config.ZeroStageEnum` (pickled by value)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3
    max_stage = 4


class _LossScaler:
    """Stand-in for DeepSpeed's loss scalers: their attributes are filled in, nothing else happens."""


class _FragmentAddress:
    """Stand-in for `deepspeed.utils.tensor_fragment.fragment_address` (a dataclass of numel and start)."""


_STAND_INS = [
    (_ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
]
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _load(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """One checkpoint file, memory-mapped: tensors stay on disk until their elements are used."""
    if not path.is_file():
        raise DeepSpeedCheckpointError(
            f"{path}: missing. Every rank writes its own file into the tag's folder; copy the whole folder, "
            f"every rank's files included (or the save did not finish)."
        )
    try:
        if allow_pickle:
            value = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        else:
            with torch.serialization.safe_globals(_STAND_INS):
                value = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found is None:
            raise DeepSpeedCheckpointError(f"{path}: not a readable checkpoint file ({exc}).") from exc
        raise UnsafeCheckpointError(
            f"{path}: refers to {found.group(1)}, which is not one of the types DeepSpeed writes into its "
            f"checkpoints; it was not loaded (a pickle can run code through such a reference). If you trust "
            f"where the file came from, pass allow_pickle=True (--allow-pickle)."
        ) from None
    except Exception as exc:
        raise DeepSpeedCheckpointError(
            f"{path}: not a readable torch.save file ({type(exc).__name__}: {exc}); it may be truncated."
        ) from exc
    if not isinstance(value, dict):
        raise DeepSpeedCheckpointError(f"{path}: holds a {type(value).__name__}, not a DeepSpeed checkpoint dict.")
    return value


# --- the folder -------------------------------------------------------------------------------------------------


def _is_tag_dir(folder: Path) -> bool:
    return any(folder.glob("*_model_states.pt"))


def _tags(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_tag_dir(p)) if folder.is_dir() else []


def checkpoint_dir(folder: str | os.PathLike, tag: str | None = None) -> Path:
    """The tag's folder: `folder/<tag>`, `tag` defaulting to what `folder/latest` names; or `folder` itself when
    it is a tag's folder (holds `*_model_states.pt`) and no other tag was asked for."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DeepSpeedCheckpointError(f"{folder}: does not exist or is not a folder; pass a DeepSpeed save folder.")
    if tag is None or tag == folder.name:
        if _is_tag_dir(folder):
            return folder
    if tag is None:
        latest = folder / LATEST_NAME
        if not latest.is_file():
            raise DeepSpeedCheckpointError(
                f"{folder}: has no {LATEST_NAME!r} file and no *_model_states.pt, so it is not a DeepSpeed "
                f"save folder. Tags present: {_tags(folder) or 'none'}; pass one as the tag, or the tag's folder."
            )
        tag = read_text(latest).strip()
        source, where = latest, f"named by {latest}"
    else:
        source, where = folder, "asked for"
    fix = f"Pass one of the tags present: {_tags(folder) or 'none'}."
    path_component(tag, source=source, what=f"DeepSpeed tag ({where})", error=DeepSpeedCheckpointError, fix=fix)
    path = folder / tag
    if not _is_tag_dir(path):
        raise DeepSpeedCheckpointError(
            f"{path}: the tag {tag!r} ({where}) {'holds no *_model_states.pt' if path.is_dir() else 'does not exist'}."
            f" Tags present in {folder}: {_tags(folder) or 'none'}; pass one of them as the tag."
        )
    return path


def _model_states_file(folder: Path) -> Path:
    names = sorted(p.name for p in folder.glob("*_model_states.pt"))
    if any("mp_rank_00" not in n for n in names):
        raise DeepSpeedCheckpointError(
            f"{folder}: holds model states of several model-parallel ranks ({names}); tensor- or pipeline-"
            f"parallel checkpoints are not supported. Convert it with DeepSpeed's ds_to_universal first."
        )
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (folder / name).is_file():
            return folder / name
    raise DeepSpeedCheckpointError(
        f"{folder}: has neither mp_rank_00_model_states.pt (ZeRO-1/2) nor "
        f"zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO-3); found {names}."
    )


def _optim_file(folder: Path, rank: int) -> Path:
    for prefix in ("", "bf16_"):
        path = folder / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        if path.is_file():
            return path
    return folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


# --- metadata ---------------------------------------------------------------------------------------------------


def _canonical(keys: Iterable[str]) -> dict[str, str]:
    """Name in the checkpoint -> canonical name: `module.` off when every name has it, then wrapper components."""
    keys = list(keys)
    strip = bool(keys) and all(k.startswith(WRAPPER_PREFIX) for k in keys)
    return {k: canonical_name(k[len(WRAPPER_PREFIX) :] if strip else k) for k in keys}


def _trained_dtype(key: str, module: dict, config: Any) -> torch.dtype:
    """The dtype the model held `key` in: its entry in `module` (empty under ZeRO-3, but typed), else the config."""
    entry = module.get(key) if isinstance(module, dict) else None
    if isinstance(entry, torch.Tensor) and entry.is_floating_point():
        return entry.dtype
    config = config if isinstance(config, dict) else {}
    for section, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
        if isinstance(config.get(section), dict) and config[section].get("enabled"):
            return dtype
    return torch.float32


def read_checkpoint(
    folder: str | os.PathLike, *, tag: str | None = None, allow_pickle: bool = False
) -> DeepSpeedCheckpoint:
    """Where each optimizer-held parameter lies, from the rank-0 model states and every rank's optimizer file
    (memory-mapped: nothing but the pickles' structure is read). Checks every rank's file is there."""
    path = checkpoint_dir(folder, tag)
    states_file = _model_states_file(path)
    states = _load(states_file, allow_pickle)
    param_shapes = states.get("param_shapes")
    if not isinstance(param_shapes, list) or not all(isinstance(g, dict) for g in param_shapes):
        raise DeepSpeedCheckpointError(
            f"{states_file}: has no per-group param_shapes, so it was not saved by a ZeRO optimizer (ZeRO "
            f"disabled, or bf16 without ZeRO); its weights are in the 'module' entry, not in fp32 partitions."
        )
    first = _optim_file(path, 0)
    optim0 = _load(first, allow_pickle).get("optimizer_state_dict")
    if not isinstance(optim0, dict) or "zero_stage" not in optim0 or "partition_count" not in optim0:
        raise DeepSpeedCheckpointError(f"{first}: has no ZeRO optimizer state (zero_stage, partition_count).")
    stage = int(optim0["zero_stage"])
    counts = optim0["partition_count"]
    counts = [int(c) for c in counts] if isinstance(counts, list | tuple) else [int(counts)]
    if len(set(counts)) != 1:
        raise DeepSpeedCheckpointError(
            f"{first}: parameter groups are partitioned over different numbers of ranks ({counts}, e.g. MoE "
            f"experts); such checkpoints are not supported."
        )
    world = counts[0]
    group_key = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups", 3: "fp32_flat_groups"}
    if stage not in group_key:
        raise DeepSpeedCheckpointError(f"{first}: unknown ZeRO stage {stage}.")
    files = [_optim_file(path, r) for r in range(world)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DeepSpeedCheckpointError(
            f"{path}: the checkpoint was saved by {world} ranks, but {missing} is missing; each rank's file "
            f"holds its part of the master weights. Copy the whole folder (or the save did not finish)."
        )
    extra = sorted(set(path.glob("*_optim_states.pt")) - set(files))
    if extra:
        raise DeepSpeedCheckpointError(
            f"{path}: holds optimizer files of more than the {world} ranks that saved it ({[p.name for p in extra]}); "
            f"another save was written into the same tag. Use a tag written by one save only."
        )
    partitions = []
    for rank, file in enumerate(files):
        optim = optim0 if rank == 0 else _load(file, allow_pickle).get("optimizer_state_dict", {})
        groups = optim.get(group_key[stage]) if isinstance(optim, dict) else None
        if not isinstance(groups, list | tuple) or not all(isinstance(t, torch.Tensor) for t in groups):
            raise DeepSpeedCheckpointError(f"{file}: has no {group_key[stage]} (the fp32 master partitions).")
        partitions.append(tuple(t.reshape(-1) for t in groups))

    module = states.get("module") if isinstance(states.get("module"), dict) else {}
    names = _canonical([k for g in param_shapes for k in g] + list(module))
    tensors: dict[str, DeepSpeedTensor] = {}
    config = states.get("ds_config")
    if stage <= 2:
        tensors = _layout_zero12(states_file, first, param_shapes, optim0, partitions, names, module, config)
    else:
        tensors = _layout_zero3(states_file, param_shapes, partitions, names, module, config, world)
    module_keys = {names[k]: k for k in module}
    frozen = _frozen(states, module, config, set(tensors))
    return DeepSpeedCheckpoint(
        path, stage, world, tensors, module_keys, frozen, states.get("ds_version"), tuple(files), tuple(partitions)
    )


def _frozen(states: dict, module: dict, config: Any, held: set[str]) -> dict[str, DeepSpeedTensor]:
    """The parameters saved without master weights: `frozen_param_shapes` (ZeRO-2/3, unless excluded), else the
    non-empty entries of `module` (ZeRO-1) that the optimizer does not hold."""
    shapes = states.get("frozen_param_shapes")
    if isinstance(shapes, dict):
        found = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
    else:
        found = {k: tuple(v.shape) for k, v in module.items() if isinstance(v, torch.Tensor) and v.numel()}
    names = _canonical(list(found))
    return {
        names[k]: DeepSpeedTensor(k, shape, _trained_dtype(k, module, config), -1, 0)
        for k, shape in found.items()
        if names[k] not in held
    }


def _add(tensors: dict, names: dict, states_file: Path, tensor: DeepSpeedTensor) -> None:
    name = names[tensor.key]
    if name in tensors:
        raise DeepSpeedCheckpointError(
            f"{states_file}: param_shapes lists {tensors[name].key!r} and {tensor.key!r}, which both name the "
            f"parameter {name!r} once wrapper prefixes are removed; it is unclear which to use."
        )
    tensors[name] = tensor


def _layout_zero12(states_file, optim_file, param_shapes, optim, partitions, names, module, config):
    """Offsets into each group's flat vector (the ranks' partitions end to end), with alignment paddings."""
    if len(param_shapes) != len(partitions[0]):
        raise DeepSpeedCheckpointError(
            f"{states_file}: param_shapes has {len(param_shapes)} groups but {optim_file} has "
            f"{len(partitions[0])} fp32 partitions; the files come from different saves."
        )
    paddings = optim.get("param_alignment_paddings")
    world = len(partitions)
    tensors: dict[str, DeepSpeedTensor] = {}
    for g, shapes in enumerate(param_shapes):
        sizes = {int(p[g].numel()) for p in partitions}
        if len(sizes) != 1:
            raise DeepSpeedCheckpointError(
                f"{states_file}: the ranks' fp32 partitions of group {g} differ in size ({sorted(sizes)}); ZeRO "
                f"partitions are equal, so the files come from different saves."
            )
        group_pads = paddings[g] if isinstance(paddings, list) and g < len(paddings) else None
        if group_pads is not None and len(group_pads) != len(shapes):
            raise DeepSpeedCheckpointError(
                f"{optim_file}: group {g} has {len(group_pads)} alignment paddings for {len(shapes)} parameters."
            )
        offset = 0
        for i, (key, shape) in enumerate(shapes.items()):
            shape = tuple(int(s) for s in shape)
            _add(
                tensors, names, states_file, DeepSpeedTensor(key, shape, _trained_dtype(key, module, config), g, offset)
            )
            offset += math.prod(shape) + (int(group_pads[i]) if group_pads is not None else 0)
        available = sizes.pop() * world
        # the flat vector ends in padding; both round up to the same multiple of 2 * world (DeepSpeed's own bound)
        align = 2 * world
        if offset > available or -(-offset // align) != -(-available // align):
            raise DeepSpeedCheckpointError(
                f"{states_file}: the parameters of group {g} take {offset} elements, but the ranks' fp32 "
                f"partitions hold {available}; param_shapes does not describe these partitions."
            )
    return tensors


def _layout_zero3(states_file, param_shapes, partitions, names, module, config, world):
    """Offsets into each rank's pieces laid end to end: `ceil(numel / world)` elements per parameter."""
    bounds = [0]
    for t in partitions[0]:
        bounds.append(bounds[-1] + int(t.numel()))
    tensors: dict[str, DeepSpeedTensor] = {}
    offset = 0
    for shapes in param_shapes:
        for key, shape in shapes.items():
            shape = tuple(int(s) for s in shape)
            group = min(bisect.bisect_right(bounds, offset), len(bounds) - 1) - 1
            _add(
                tensors,
                names,
                states_file,
                DeepSpeedTensor(key, shape, _trained_dtype(key, module, config), group, offset),
            )
            offset += math.ceil(math.prod(shape) / world)
    for rank, groups in enumerate(partitions):
        held = sum(int(t.numel()) for t in groups)
        if held != offset:
            raise DeepSpeedCheckpointError(
                f"{states_file}: param_shapes needs {offset} elements per rank, but rank {rank}'s fp32 flat "
                f"groups hold {held}; the files come from different saves."
            )
    return tensors


def deepspeed_tensors(
    folder: str | os.PathLike, *, tag: str | None = None, allow_pickle: bool = False
) -> dict[str, DeepSpeedTensor]:
    """Canonical name -> the optimizer's parameters (shape, trained dtype, place), from metadata alone.

    Only parameters the optimizer holds (the trainable ones) are listed: frozen parameters have no fp32
    master weights (see `DeepSpeedCheckpoint.module_keys` for every name the model states saved).
    """
    return read_checkpoint(folder, tag=tag, allow_pickle=allow_pickle).tensors


# --- reading ----------------------------------------------------------------------------------------------------


def _copy_range(pieces: tuple[torch.Tensor, ...], start: int, out: torch.Tensor) -> None:
    """Elements [start, start + len(out)) of `pieces` laid end to end, into `out` (only those pages are read)."""
    done, base = 0, 0
    for piece in pieces:
        n = int(piece.numel())
        lo = max(start + done, base)
        if lo < base + n and done < out.numel():
            take = min(base + n - lo, out.numel() - done)
            out[done : done + take].copy_(piece[lo - base : lo - base + take])
            done += take
        base += n
        if done == out.numel():
            return
    raise DeepSpeedCheckpointError(f"elements {start}..{start + out.numel()} lie beyond the saved partitions.")


def _read_one(checkpoint: DeepSpeedCheckpoint, tensor: DeepSpeedTensor) -> torch.Tensor:
    out = torch.empty(tensor.numel, dtype=torch.float32)
    if checkpoint.stage <= 2:
        _copy_range(tuple(p[tensor.group] for p in checkpoint.partitions), tensor.offset, out)
    else:
        piece = math.ceil(tensor.numel / checkpoint.world_size)
        for rank, groups in enumerate(checkpoint.partitions):
            lo = rank * piece
            if lo >= tensor.numel:
                break
            _copy_range(groups, tensor.offset, out[lo : min(lo + piece, tensor.numel)])
    return out.view(tensor.shape)


def _model_states(checkpoint: DeepSpeedCheckpoint, rank: int, allow_pickle: bool) -> dict[str, Any]:
    name = "mp_rank_00_model_states.pt" if checkpoint.stage <= 2 else f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
    return _load(checkpoint.folder / name, allow_pickle)


def read_frozen(
    checkpoint: DeepSpeedCheckpoint, names: Iterable[str], *, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Frozen parameters (`checkpoint.frozen`; no fp32 master weights: in the dtype they trained in), as full CPU
    tensors: from `frozen_param_fragments` (ZeRO-3: each rank's model states hold `ceil(numel / world)` elements
    of each) or `module` (ZeRO-1/2). The files are memory-mapped: only these parameters' pages are read."""
    wanted = list(dict.fromkeys(names))
    missing = [n for n in wanted if n not in checkpoint.frozen]
    if missing:
        raise DeepSpeedCheckpointError(
            f"{checkpoint.folder}: no frozen parameter named {missing[:5]} was saved (saved with "
            f"exclude_frozen_parameters=True, or not a parameter of this model)."
        )
    if not wanted:
        return {}
    out = {n: torch.empty(checkpoint.frozen[n].numel, dtype=checkpoint.frozen[n].dtype) for n in wanted}
    ranks = range(checkpoint.world_size) if checkpoint.stage == 3 else range(1)
    for rank in ranks:
        states = _model_states(checkpoint, rank, allow_pickle)
        fragments = states.get("frozen_param_fragments")
        source = fragments if isinstance(fragments, dict) else states.get("module") or {}
        for name in wanted:
            entry = checkpoint.frozen[name]
            value = source.get(entry.key)
            piece = math.ceil(entry.numel / checkpoint.world_size) if checkpoint.stage == 3 else entry.numel
            lo = rank * piece if checkpoint.stage == 3 else 0
            take = max(0, min(piece, entry.numel - lo))
            if not isinstance(value, torch.Tensor) or value.numel() < take:
                raise DeepSpeedCheckpointError(
                    f"{checkpoint.folder}: rank {rank}'s model states hold no data for the frozen parameter "
                    f"{entry.key!r} ({'none' if value is None else tuple(value.shape)}); the files are damaged."
                )
            out[name][lo : lo + take].copy_(value.reshape(-1)[:take])
    return {n: out[n].view(checkpoint.frozen[n].shape) for n in wanted}


def read_tensors(
    folder: str | os.PathLike | DeepSpeedCheckpoint,
    names: Iterable[str],
    *,
    tag: str | None = None,
    allow_pickle: bool = False,
) -> dict[str, torch.Tensor]:
    """The fp32 master weights of `names` (canonical parameter names), as full CPU tensors.

    Cast them to `deepspeed_tensors(...)[name].dtype` for what the live model held. Memory: the returned
    tensors, plus the pages of the mapped partitions they were copied from.
    """
    checkpoint = (
        folder
        if isinstance(folder, DeepSpeedCheckpoint)
        else read_checkpoint(folder, tag=tag, allow_pickle=allow_pickle)
    )
    wanted = list(dict.fromkeys(names))
    missing = [n for n in wanted if n not in checkpoint.tensors]
    if missing:
        frozen = [n for n in missing if n in checkpoint.module_keys or n in checkpoint.frozen]
        why = (
            f"; {frozen[:5]} are frozen parameters, which have no fp32 master weights (read them with read_frozen)"
            if frozen
            else ""
        )
        raise DeepSpeedCheckpointError(
            f"{checkpoint.folder}: the optimizer holds no parameter named {missing[:5]}"
            f"{' (and more)' if len(missing) > 5 else ''}{why}; it holds {len(checkpoint.tensors)}, e.g. "
            f"{list(checkpoint.tensors)[:3]}."
        )
    return {name: _read_one(checkpoint, checkpoint.tensors[name]) for name in wanted}
