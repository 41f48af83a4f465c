"""Who this process is: one rule (`shardsave.log.process_rank`), read by `Ranks.current` and by the logger's rank
filter and prefix alike, so that the logger needs nothing from `shardsave.ranks`."""

from __future__ import annotations

import logging

import torch.distributed as dist

from shardsave.log import _RankFormatter, _RankZeroOnly, process_rank
from shardsave.ranks.identity import Ranks


def _record() -> logging.LogRecord:
    return logging.LogRecord("shardsave", logging.INFO, __file__, 1, "saved %d", (3,), None)


def test_without_a_process_group_this_is_rank_0_of_1():
    assert process_rank() == (0, 1)
    assert Ranks.current() == Ranks() and not Ranks.current().distributed
    assert _RankFormatter("%(message)s").format(_record()) == "shardsave: saved 3"


def test_the_logger_and_ranks_read_the_same_rank(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    monkeypatch.delenv("SHARDSAVE_LOG_ALL_RANKS", raising=False)
    assert process_rank() == (3, 8)
    assert Ranks.current() == Ranks(3, 8)
    assert _RankFormatter("%(message)s").format(_record()) == "[rank 3] shardsave: saved 3"
    assert not _RankZeroOnly().filter(_record())  # rank 3 logs only what its writer marks
