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

from .load import LoadResult, load_pretrained
from .log import enable_logging
from .merged_save import save_merged
from .ranks import MissingRanksError, RemoteError, SaveError
from .save import gather_state_dict, save_pretrained
from .shards import save_shards

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
    # imported lazily so that `python -m shardsave.merge` does not find the module already imported
    if name in ("merge_shards", "ShardSetError"):
        from . import merge

        return getattr(merge, name)
    if name in ("rescue_adapter", "RescueError"):
        from . import rescue

        return getattr(rescue, name)
    if name in ("merge_into", "MergedError"):
        from . import merged

        return getattr(merged, name)
    raise AttributeError(f"module 'shardsave' has no attribute {name!r}")
