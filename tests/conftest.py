"""Shared builders: tiny transformers models made from configs (nothing is downloaded) and comparisons
against PEFT's own `save_pretrained`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT's vocab check must not reach the Hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "helpers"))  # tiny, backends, multirank, workers, ...


def deselects_multirank(markexpr: str) -> bool:
    """True for the quick command's `-m "not multirank"` (alone or joined with `and`)."""
    return "not multirank" in " ".join(markexpr.split())


def pytest_configure(config):
    import multirank

    if deselects_multirank(config.getoption("markexpr") or ""):
        multirank.SKIP_REASON = 'starts several ranks: deselected by -m "not multirank"'


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A test that calls run_ranks itself is multi-rank even without the marker, so `-m "not multirank"`
    deselects it before its fixtures run (the ones whose fixtures start ranks are skipped there)."""
    for item in items:
        code = getattr(getattr(item, "function", None), "__code__", None)
        if code is not None and "run_ranks" in code.co_names:
            item.add_marker(pytest.mark.multirank)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
