"""The `shardsave` logger: records from rank 0 (or marked `extra={"writer": True}`, from the writing rank)
only, unless SHARDSAVE_LOG_ALL_RANKS=1, so that a 64-rank job logs a save once.

Quiet by default, as a library should be: warnings reach stderr through Python's last-resort handler, info
lines (what was saved where, how many tensors, bytes, seconds) only after one switch, `SHARDSAVE_LOG_LEVEL=INFO`
in the environment or `shardsave.enable_logging()`. An application that configures logging itself needs
neither: `logging.getLogger("shardsave").setLevel(logging.INFO)` and its own handlers.
"""

from __future__ import annotations

import logging
import os

__all__ = ["logger", "enable_logging", "process_rank", "LOG_LEVEL_VARIABLE"]

LOG_LEVEL_VARIABLE = "SHARDSAVE_LOG_LEVEL"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in the default process group, (0, 1) without one: the one rule, here at
    the bottom so that the logger needs nothing above it (`shardsave.ranks.identity.Ranks.current` uses it)."""
    import torch.distributed as dist  # here: importing the logger costs no torch import

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _RankZeroOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("SHARDSAVE_LOG_ALL_RANKS") == "1" or getattr(record, "writer", False):
            return True
        return process_rank()[0] == 0


class _RankFormatter(logging.Formatter):
    """`[rank R] shardsave: message` in a distributed job, `shardsave: message` alone; the level is named
    from WARNING up."""

    def format(self, record: logging.LogRecord) -> str:
        rank, world_size = process_rank()
        prefix = f"[rank {rank}] " if world_size > 1 else ""
        level = f" {record.levelname}" if record.levelno >= logging.WARNING else ""
        return f"{prefix}{record.name}{level}: {super().format(record)}"


class _ShardsaveHandler(logging.StreamHandler):
    """The handler enable_logging adds (one, whatever the number of calls)."""


def enable_logging(level: int | str = "INFO") -> logging.Logger:
    """Print the `shardsave` logger's records at `level` and above to stderr (one handler, however often
    called; the records do not propagate to the root logger as well, so nothing is printed twice)."""
    if isinstance(level, str):
        name = level.strip().upper()
        if name not in _LEVELS:
            raise ValueError(f"shardsave log level {level!r} is not a logging level: use one of {', '.join(_LEVELS)}.")
        level = getattr(logging, name)
    if not any(isinstance(h, _ShardsaveHandler) for h in logger.handlers):
        handler = _ShardsaveHandler()
        handler.setFormatter(_RankFormatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


logger = logging.getLogger("shardsave")
logger.addFilter(_RankZeroOnly())

if os.environ.get(LOG_LEVEL_VARIABLE):
    try:
        enable_logging(os.environ[LOG_LEVEL_VARIABLE])
    except ValueError as exc:  # a typo in a logging switch must not stop a training job from importing
        logger.warning("%s ignored: %s", LOG_LEVEL_VARIABLE, exc)
