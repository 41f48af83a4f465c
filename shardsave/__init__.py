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
    from .load import LoadResult, load_pretrained
    from .log import enable_logging
    from .merge import ShardSetError, merge_shards
    from .merged import MergedError, merge_into
    from .merged_save import save_merged
    from .ranks import MissingRanksError, RemoteError, SaveError
    from .rescue import RescueError, rescue_adapter
    from .save import gather_state_dict, save_pretrained
    from .shards import save_shards

# each public name -> the module that defines it. Imported on first use (PEP 562), so that `import shardsave` imports no
# module that `python -m shardsave.verify` / `python -m shardsave.merge` then runs as `__main__` (runpy warns, and
# the module would exist twice).
_PUBLIC = {
    "save_pretrained": "save",
    "load_pretrained": "load",
    "LoadResult": "load",
    "gather_state_dict": "save",
    "save_shards": "shards",
    "merge_shards": "merge",
    "ShardSetError": "merge",
    "rescue_adapter": "rescue",
    "RescueError": "rescue",
    "save_merged": "merged_save",
    "merge_into": "merged",
    "MergedError": "merged",
    "SaveError": "ranks",
    "MissingRanksError": "ranks",
    "RemoteError": "ranks",
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
