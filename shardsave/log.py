"""The `shardsave` logger: records from rank 0 (or marked `extra={"writer": True}`, from the writing rank)
only, unless SHARDSAVE_LOG_ALL_RANKS=1, so that a 64-rank job logs a save once."""

from __future__ import annotations

import logging
import os

__all__ = ["logger"]


class _RankZeroOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("SHARDSAVE_LOG_ALL_RANKS") == "1" or getattr(record, "writer", False):
            return True
        from .ranks import Ranks

        return Ranks.current().rank == 0


logger = logging.getLogger("shardsave")
logger.addFilter(_RankZeroOnly())
