"""shardsave: save PEFT adapters out of distributed training, exactly as PEFT writes them.

Public API::

    shardsave.save_pretrained(model, save_directory, ...)   # every rank calls; the main process writes
    shardsave.load_pretrained(model, path, ...)             # every rank calls; each reads what it holds
    shardsave.gather_state_dict(model, keep=None)           # full tensors of chosen parameters on one rank
    shardsave.save_shards(model, shards_directory, ...)     # every rank writes what it holds
    shardsave.merge_shards(shards_directory, output, ...)   # files only: python -m shardsave.merge
    shardsave.rescue_adapter(checkpoint, output, ...)       # from a DeepSpeed / DCP checkpoint (same CLI)
    shardsave.save_merged(model, save_directory, ...)       # every rank calls: merged full weights, streamed
    shardsave.merge_into(adapter, base, output, ...)        # offline: python -m shardsave.merge SRC --into BASE
    shardsave.enable_logging()                              # info lines on stderr (or SHARDSAVE_LOG_LEVEL=INFO)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardsave.load.pretrained import LoadResult, load_pretrained
    from shardsave.log import enable_logging
    from shardsave.merged.live import save_merged
    from shardsave.merged.offline import MergedError, merge_into
    from shardsave.rescue.checkpoint import rescue_adapter
    from shardsave.save.gathered import gather_state_dict, save_pretrained
    from shardsave.save.shards import save_shards
    from shardsave.save.stitch import ShardSetError, merge_shards

# each public name -> the module that defines it. Imported on first use (PEP 562), so that `import shardsave` imports no
# module that `python -m shardsave.verify` / `python -m shardsave.merge` then runs as `__main__` (runpy warns, and
# the module would exist twice).
_PUBLIC = {
    "save_pretrained": "save.gathered",
    "load_pretrained": "load.pretrained",
    "LoadResult": "load.pretrained",
    "gather_state_dict": "save.gathered",
    "save_shards": "save.shards",
    "merge_shards": "save.stitch",
    "ShardSetError": "errors",
    "rescue_adapter": "rescue.checkpoint",
    "RescueError": "errors",
    "save_merged": "merged.live",
    "merge_into": "merged.offline",
    "MergedError": "errors",
    "SaveError": "errors",
    "MissingRanksError": "errors",
    "RemoteError": "errors",
    "enable_logging": "log",
}
__all__ = [
    "save_pretrained",
    "load_pretrained",
    "LoadResult",
    "gather_state_dict",
    "save_shards",
    "merge_shards",
    "ShardSetError",
    "rescue_adapter",
    "RescueError",
    "save_merged",
    "merge_into",
    "MergedError",
    "SaveError",
    "MissingRanksError",
    "RemoteError",
    "enable_logging",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shardsave' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
