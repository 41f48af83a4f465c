"""Reusing a save's plan for the next save of the same, unchanged model.

Trainer saves the same model every N steps; walking its modules and planning again each time is most of a
save's fixed cost. A plan is reused only while a snapshot of the module tree proves the structure unchanged:
every module's child, parameter and buffer dicts hold the same objects under the same names (and nothing
more), and every parameter's `requires_grad` is the same. Checking that is a flat loop of identity tests,
much cheaper than the walk and the planning, and it needs no hook: additions, removals and replacements made
by any means (`register_*`, `del`, `module._parameters[k] = ...`, `model.to()` building new parameters) all
change what it compares. Tensor values are never cached: every save reads them afresh.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import nn

__all__ = ["Snapshot", "PlanCache"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """The module tree under a root, as weak references (the snapshot keeps no module or tensor alive; a dead
    reference counts as a change, so a freed object's address taken by a new one cannot pass for it)."""

    modules: tuple[tuple[weakref.ref, tuple, tuple, tuple, frozenset], ...]
    grads: tuple[bool, ...]

    @classmethod
    def of(cls, root: nn.Module) -> Snapshot:
        modules, grads = [], []
        for module in root.modules():
            modules.append(
                (
                    weakref.ref(module),
                    _refs(module._modules),
                    _refs(module._parameters),
                    _refs(module._buffers),
                    frozenset(module._non_persistent_buffers_set),
                )
            )
            grads.extend(bool(p.requires_grad) for p in module._parameters.values() if p is not None)
        return cls(tuple(modules), tuple(grads))

    def unchanged(self) -> bool:
        """Whether the tree still is what it was (same objects, names, sizes, `requires_grad`)."""
        grads = iter(self.grads)
        for ref, children, params, buffers, non_persistent in self.modules:
            module = ref()
            if module is None or not (
                _same(module._modules, children)
                and _same(module._parameters, params)
                and _same(module._buffers, buffers)
                and module._non_persistent_buffers_set == non_persistent
            ):
                return False
            for p in module._parameters.values():
                if p is not None and bool(p.requires_grad) != next(grads):
                    return False
        return True


def _refs(entries: dict) -> tuple[tuple[str, weakref.ref | None], ...]:
    return tuple((name, None if obj is None else weakref.ref(obj)) for name, obj in entries.items())


def _same(live: dict, saved: tuple) -> bool:
    if len(live) != len(saved):
        return False
    for name, ref in saved:
        obj = live.get(name, _MISSING)
        if obj is _MISSING or (None if ref is None else ref()) is not obj or (ref is not None and obj is None):
            return False
    return True


_MISSING = object()


class PlanCache(Generic[T]):
    """The last plan per root module, reused while the key is equal and the snapshot `unchanged()`."""

    def __init__(self) -> None:
        self._plans: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, Snapshot, T]] = weakref.WeakKeyDictionary()

    def get(self, root: nn.Module, key: Hashable, build: Callable[[], T]) -> T:
        cached = self._plans.get(root)
        if cached is not None and cached[0] == key and cached[1].unchanged():
            return cached[2]
        snapshot = Snapshot.of(root)
        plan = build()
        self._plans[root] = (key, snapshot, plan)
        return plan
