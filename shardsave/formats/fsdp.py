"""Read the model files accelerate's `save_fsdp_model` writes without DCP, reading tensors only.

accelerate (and so Trainer) saves an FSDP model as a DCP folder `pytorch_model_fsdp_0/` under
SHARDED_STATE_DICT (read by `shardsave.formats.dcp`), and otherwise as `torch.save` files in the checkpoint folder:

- FULL_STATE_DICT: `pytorch_model_fsdp.bin`, written by process 0, the full tensors;
- SHARDED_STATE_DICT with `use_dcp=False` (and FSDP1's LOCAL_STATE_DICT): `pytorch_model_fsdp_0_rank{N}.bin`,
  one per process, each holding that process's state dict: DTensors under FSDP2 (every file knows the global
  shape, the placements and the mesh, so the files together give each full tensor), ShardedTensors under FSDP1.

Safety: the files are pickles; they are loaded with `torch.load(weights_only=True, mmap=True)` only (DTensor,
its mesh and placements are on torch's own weights-only allowlist). FSDP1's ShardedTensor is not, and it
cannot be rebuilt without a process group: such a file is refused with what it holds, read from the pickle's
opcodes without running them (`pickletools`).
"""

from __future__ import annotations

import math
import os
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from shardsave.errors import FSDPFileError, ShardedTensorFileError
from shardsave.plan.placements import Spec, holding_of, nested_ranks, spec_of

__all__ = [
    "FULL_NAME",
    "RANK_FILE",
    "FSDPFileError",
    "ShardedTensorFileError",
    "FSDPFiles",
    "fsdp_files",
    "open_fsdp_files",
]

#: What FULL_STATE_DICT writes (`FSDP_MODEL_NAME.bin`, model index 0).
FULL_NAME = "pytorch_model_fsdp.bin"
#: What SHARDED_STATE_DICT with `use_dcp=False` (and LOCAL_STATE_DICT) write, one per process (model index 0).
RANK_FILE = re.compile(r"pytorch_model_fsdp_0_rank(\d+)\.bin$")
_SHARDED_TENSOR = "torch.distributed._shard.sharded_tensor.api ShardedTensor"


@dataclass(slots=True)
class FSDPFiles:
    """The model files of one checkpoint folder: key as saved -> (global shape, dtype), and the files."""

    folder: Path
    files: list[Path]
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    _loaded: list[dict]

    def describe(self) -> str:
        last = len(self.files) - 1
        return self.files[0].name if not last else f"pytorch_model_fsdp_0_rank{{0..{last}}}.bin"

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The full CPU tensors of `keys` (keys as saved), assembled from every rank's file where sharded."""
        missing = [k for k in keys if k not in self.tensors]
        if missing:
            raise FSDPFileError(f"{self.folder}: {self.describe()} has no tensor {missing[:5]}.")
        return {k: self._read_one(k) for k in keys}

    def _read_one(self, key: str) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        first = self._loaded[0][key]
        if not isinstance(first, DTensor):
            return first.detach().clone()
        shape, dtype = self.tensors[key]
        mesh = first.device_mesh.mesh.tolist()
        specs = tuple(_spec(self.files[0], key, p) for p in first.placements)
        try:
            holding = holding_of(shape, nested_ranks(mesh), specs)
        except ValueError as exc:
            raise FSDPFileError(f"{self.files[0]}: {key}: {exc}") from None
        out = torch.empty(math.prod(shape), dtype=dtype)
        for piece in holding.senders():
            local = self._local(piece.rank, key)
            offset = next(off for s, off in holding.held[piece.rank] if s.start == piece.start)
            out[piece.start : piece.stop] = local[offset : offset + piece.stop - piece.start]
        return out.view(shape)

    def _local(self, rank: int, key: str) -> torch.Tensor:
        if rank >= len(self._loaded):
            raise FSDPFileError(
                f"{self.folder}: {key} is sharded over rank {rank}, but only {len(self._loaded)} rank file(s) "
                f"({self.describe()}) are here; copy every rank's file."
            )
        value = self._loaded[rank].get(key)
        if value is None or not hasattr(value, "to_local"):
            raise FSDPFileError(f"{self.files[rank]}: lacks the shard of {key} the other ranks' files describe.")
        return value.to_local().reshape(-1)


def _spec(path: Path, key: str, placement) -> Spec:
    spec = spec_of(placement)
    if spec is None:
        raise FSDPFileError(f"{path}: {key} is placed as {placement}, which is not a layout of values shardsave reads.")
    return spec


def fsdp_files(folder: str | os.PathLike) -> list[Path]:
    """The FSDP model files accelerate wrote into `folder` (model index 0): `[pytorch_model_fsdp.bin]`, or the
    rank files in rank order, or `[]`."""
    folder = Path(folder)
    if (folder / FULL_NAME).is_file():
        return [folder / FULL_NAME]
    ranks = {int(m.group(1)): p for p in folder.iterdir() if (m := RANK_FILE.match(p.name)) and p.is_file()}
    return [ranks[r] for r in sorted(ranks)]


def _pickle_globals_and_keys(path: Path) -> tuple[set[str], list[str]]:
    """The globals a `torch.save` file's pickle refers to and the parameter-like strings in it, from its
    opcodes alone (nothing is run)."""
    found: set[str] = set()
    strings: list[str] = []
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            data = z.read(name)
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.add(str(arg))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(f"{strings[-2]} {strings[-1]}")
            if isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
    except Exception:  # not a zip torch.save file: the load below says so
        pass
    return found, [s for s in dict.fromkeys(strings) if s.startswith("base_model.") or ".weight" in s]


def _load(path: Path) -> dict:
    import torch.distributed.tensor  # noqa: F401  (torch.load's weights-only allowlist needs DTensor imported)

    globals_, keys = _pickle_globals_and_keys(path)
    if _SHARDED_TENSOR in globals_:
        raise ShardedTensorFileError(
            f"{path}: holds FSDP1 ShardedTensors ({len(keys)} key(s), e.g. {keys[:3]}), which cannot be read "
            f"without running their pickled code (torch.load(weights_only=True) refuses them, and rebuilding one "
            f"needs the training's process group); shardsave reads FSDP1's DCP folders (use_dcp=True) and FSDP2's "
            f"rank files.",
            keys,
        )
    try:
        value = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise FSDPFileError(
            f"{path}: not readable with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})."
        ) from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise FSDPFileError(f"{path}: holds a {type(value).__name__}, not a state dict (parameter name -> tensor).")
    return value


def open_fsdp_files(folder: str | os.PathLike) -> FSDPFiles:
    """The FSDP model files of `folder` (see `fsdp_files`): their keys, global shapes and dtypes (the files are
    mapped, not read), every rank file present and agreeing on the keys."""
    folder = Path(folder)
    files = fsdp_files(folder)
    if not files:
        raise FSDPFileError(f"{folder}: holds no {FULL_NAME} or pytorch_model_fsdp_0_rank<N>.bin.")
    ranks = [int(m.group(1)) for p in files if (m := RANK_FILE.match(p.name))]
    if ranks and ranks != list(range(len(ranks))):
        gaps = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise FSDPFileError(f"{folder}: the rank files of ranks {gaps} are missing; copy every rank's file.")
    loaded = [_load(p) for p in files]
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for key, value in loaded[0].items():
        if not isinstance(value, torch.Tensor):
            raise FSDPFileError(f"{files[0]}: {key} holds a {type(value).__name__}, not a tensor.")
        tensors[key] = (tuple(value.shape), value.dtype)
    for path, other in zip(files[1:], loaded[1:], strict=True):
        if set(other) != set(tensors):
            diff = sorted(set(other) ^ set(tensors))
            raise FSDPFileError(f"{path}: its keys differ from {files[0].name}'s (e.g. {diff[:3]}): two saves' files?")
    for value in loaded[0].values() if ranks else ():
        mesh = getattr(value, "device_mesh", None)
        if mesh is not None and int(mesh.mesh.max()) >= len(files):
            raise FSDPFileError(
                f"{folder}: the tensors are sharded over ranks up to {int(mesh.mesh.max())}, but only {len(files)} "
                f"rank files are here (ranks 0..{len(files) - 1}); copy every rank's file."
            )
    return FSDPFiles(folder, files, tensors, loaded)
