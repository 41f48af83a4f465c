"""FSDP1 (`FullyShardedDataParallel`): each unit's parameters live flattened in one `FlatParameter`, of
which rank r holds elements `[r*S, (r+1)*S)`; original parameter i occupies a known range of it."""

from __future__ import annotations

import gc
import math
import weakref
import zlib
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.distributed as dist
from torch import nn

from shardsave.plan.names import canonical_name
from shardsave.ranks.collect.base import TensorInfo
from shardsave.ranks.collect.sharded import ShardedCollector, Slice
from shardsave.ranks.collect.walk import state_entries

__all__ = ["FSDP1Collector"]


@dataclass(frozen=True, slots=True)
class _FlatPlace:
    """Where one original parameter lives inside its unit's flat parameter."""

    flat: nn.Parameter
    offset: int  # in the unsharded flat parameter
    shard: int  # elements per rank
    group_ranks: tuple[int, ...] | None  # global rank of each shard, in this rank's group; None: NO_SHARD
    groups: tuple[tuple[int, ...], ...] = ()  # every shard group (HYBRID_SHARD: one per replica), this one first


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_flat_param(t: torch.Tensor) -> bool:
    return hasattr(t, "_fqns") and hasattr(t, "_numels_with_padding")


class FSDP1Collector(ShardedCollector):
    backend = "fsdp1"

    def __init__(self, root: nn.Module, rank: int, world_size: int):
        super().__init__(rank, world_size)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        order = {}
        for raw, _ in root.named_modules(remove_duplicate=False):
            order.setdefault(canonical_name(raw), len(order))

        self._places: dict[str, _FlatPlace] = {}
        infos: dict[str, TensorInfo] = {}
        keys: dict[str, tuple] = {}  # state-dict position: (module in pre-order, params before buffers, index)
        for raw_path, module in root.named_modules():
            if not isinstance(module, FSDP) or module._handle is None:
                continue
            handle = module._handle
            flat = handle.flat_param
            group, groups = None, ()
            if handle.uses_sharded_strategy:
                pg = handle.process_group
                group = tuple(dist.get_global_rank(pg, i) for i in range(pg.size()))
                groups = (group,) if pg.size() == world_size else _hybrid_groups(module, group, world_size, raw_path)
            starts = [0, *accumulate(flat._numels_with_padding)][:-1]
            offsets = [s for s, pad in zip(starts, flat._is_padding_mask, strict=True) if not pad]
            shard = int(flat._sharded_size[0]) if group is not None else 0
            for index, (fqn, shape, offset) in enumerate(zip(flat._fqns, flat._shapes, offsets, strict=True)):
                name = canonical_name(_join(raw_path, fqn))
                self._places[name] = _FlatPlace(flat, offset, shard, group, groups)
                infos[name] = TensorInfo(tuple(shape), flat.dtype, bool(flat.requires_grad))
                keys[name] = (order.get(name.rpartition(".")[0], len(order)), 0, index)
            for spi in flat._shared_param_infos:
                name = canonical_name(_join(raw_path, spi.module_name, spi.param_name))
                primary = canonical_name(_join(raw_path, spi.prim_module_name, spi.prim_param_name))
                self._aliases[name] = primary
                keys[name] = (order.get(name.rpartition(".")[0], len(order)), 0, len(keys))

        self._tensors: dict[str, torch.Tensor] = {}
        registered_grad: dict[str, bool] = {}
        for position, (name, tensor, is_param) in enumerate(state_entries(root)):
            if _is_flat_param(tensor):
                continue
            if name in self._places or name in self._aliases:  # use_orig_params=True: a sharded view
                registered_grad[name] = bool(tensor.requires_grad)
                continue
            self._tensors[name] = tensor
            infos[name] = TensorInfo(tuple(tensor.shape), tensor.dtype, bool(tensor.requires_grad) and is_param)
            keys[name] = (order.get(name.rpartition(".")[0], len(order)), int(not is_param), position)

        for name, primary in self._aliases.items():
            infos[name] = infos[primary]
        for name, requires_grad in registered_grad.items():  # per original parameter, not per unit
            infos[name] = TensorInfo(infos[name].shape, infos[name].dtype, requires_grad)
        self._infos = {name: infos[name] for name in sorted(infos, key=keys.__getitem__)}

    def _slices(self, name: str) -> list[Slice] | None:
        place = self._places.get(name)
        if place is None or place.group_ranks is None:
            return None
        groups = sorted(place.groups)  # the same order on every rank
        shift = zlib.crc32(name.encode())
        ranges = enumerate(self._ranges(name, place))
        return [Slice(groups[(i + shift) % len(groups)][i], lo, hi) for i, (lo, hi) in ranges if hi > lo]

    def _ranges(self, name: str, place: _FlatPlace) -> list[tuple[int, int]]:
        """Elements of `name` in each shard of its flat parameter (shard i: the i-th rank of a shard group)."""
        numel = math.prod(self._infos[name].shape)
        out = []
        for i in range(len(place.group_ranks)):
            lo = max(place.offset, i * place.shard)
            hi = min(place.offset + numel, (i + 1) * place.shard)
            out.append((lo - place.offset, max(hi, lo) - place.offset))
        return out

    def own(self, name: str) -> list[Slice]:
        place = self._places.get(name)
        if place is None or place.group_ranks is None:
            return []
        lo, hi = self._ranges(name, place)[self._group_index(place)]
        return [Slice(self.rank, lo, hi)] if hi > lo else []

    def replicated(self, name: str) -> bool:
        place = self._places.get(name)
        return place is not None and len(place.groups) > 1

    def held_by(self, name: str, rank: int) -> list[tuple[int, int]]:
        place = self._places.get(name)
        if place is None or len(place.groups) < 2:
            return []
        k = next((g.index(rank) for g in place.groups if rank in g), None)
        lo, hi = (0, 0) if k is None else self._ranges(name, place)[k]
        return [(lo, hi)] if hi > lo else []

    def holders(self, name: str, run: Slice) -> tuple[int, ...]:
        """HYBRID_SHARD: shard `k` of every replica's shard group holds the same range: those ranks."""
        groups = self._places[name].groups
        k = next(g.index(self.rank) for g in groups if self.rank in g)
        return tuple(sorted(g[k] for g in groups))

    def local(self, name: str, piece: Slice) -> torch.Tensor:
        place = self._places[name]
        shard = place.flat.data
        if shard.numel() != place.shard:
            raise RuntimeError(
                f"{name}: the FSDP1 flat parameter holds {shard.numel()} elements on this rank, expected its "
                f"{place.shard}-element shard; do not save inside summon_full_params() or a forward pass."
            )
        begin = place.offset + piece.start - self._group_index(place) * place.shard
        return shard[begin : begin + piece.stop - piece.start]

    def _group_index(self, place: _FlatPlace) -> int:
        return place.group_ranks.index(self.rank)

    def whole(self, name: str) -> torch.Tensor:
        place = self._places.get(name)
        if place is None:
            return self._tensors[name]
        numel = math.prod(self._infos[name].shape)
        return place.flat.data[place.offset : place.offset + numel].view(self._infos[name].shape)


def _hybrid_groups(module, own: tuple[int, ...], world_size: int, where: str) -> tuple[tuple[int, ...], ...]:
    """Every shard group of a HYBRID_SHARD unit, this rank's first: the rows of its 2-D device mesh (replicate x
    shard), or, without one, the consecutive blocks FSDP1 forms per node. Otherwise (a pipeline stage's group, or
    groups cut some other way) only this rank's own group: the ranks then describe different layouts, and the
    save puts together what each rank reports it holds."""
    mesh = getattr(module, "_device_mesh", None)
    if mesh is not None and mesh.ndim == 2:
        rows = [tuple(int(r) for r in row) for row in mesh.mesh.tolist()]
    else:
        n = len(own)
        rows = [tuple(range(i, i + n)) for i in range(0, world_size, n)] if world_size % n == 0 else []
    if own not in rows or sorted(r for row in rows for r in row) != list(range(world_size)):
        return (own,)  # the other groups are unknown here: what each rank holds is put together by all (stages.py)
    return (own, *(row for row in rows if row != own))


def outermost_fsdp(module: nn.Module) -> nn.Module:
    """The FSDP1 root that wraps `module`, when the caller passed the inner model (what
    `accelerator.unwrap_model` returns): the root's own flat parameter holds some of its tensors.

    A module has no link to its wrapper (nothing reachable from an FSDP1-managed module leads back to its
    `FullyShardedDataParallel`, before or after a forward), so the wrapper is found among the objects that
    refer to it; FSDP1 marks every module it manages (`_is_fsdp_managed_module`), so this search only runs
    when it must.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    current = module
    for _ in range(64):
        if not getattr(current, "_is_fsdp_managed_module", False) or isinstance(current, FSDP):
            break
        owner = _wrapper_of(current, FSDP)
        if owner is None:
            break
        current = owner
        if not getattr(current, "_is_fsdp_managed_module", False):
            break
    return current


_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a heap scan: 25-100 ms per 10^6 objects
_WRAPPED = "_fsdp_wrapped_module"


def _wrapper_of(module: nn.Module, fsdp_cls: type) -> nn.Module | None:
    """The FSDP1 instance whose `_fsdp_wrapped_module` is `module`. Remembered per module."""
    cached = _WRAPPERS.get(module)
    if cached is not None and cached._modules.get(_WRAPPED) is module:
        return cached
    found = _search_wrapper(module, fsdp_cls)
    if found is not None:
        _WRAPPERS[module] = found
    return found


def _search_wrapper(module: nn.Module, fsdp_cls: type) -> nn.Module | None:
    """Follow the references back: `module` <- the wrapper's `_modules` (under `_fsdp_wrapped_module`) <- the
    wrapper's `__dict__` (under `_modules`) <- the wrapper. `gc.get_referrers` scans the whole heap, so each
    link is one call for all its candidates, keeping only the dicts that hold the previous link under its
    key: three scans at most, however many other objects refer to the model."""
    held: list = [module]
    for key in (_WRAPPED, "_modules", None):
        referrers = gc.get_referrers(*held)
        for ref in referrers:
            if isinstance(ref, fsdp_cls) and ref._modules.get(_WRAPPED) is module:
                return ref
        if key is None:
            return None
        ids = {id(obj) for obj in held}
        held = [ref for ref in referrers if isinstance(ref, dict) and id(ref.get(key)) in ids]
        if not held:
            return None
    return None
