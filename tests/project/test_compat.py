"""The supported PEFT range: the rule on version strings, and what a save does with an unsupported PEFT."""

from __future__ import annotations

import warnings

import peft
import pytest
from peft import LoraConfig
from tiny import peft_model

import shardsave
from shardsave import compat


def test_tested_range_is_accepted_silently():
    for version in (compat.PEFT_OLDEST, "0.17.1", compat.PEFT_NEWEST_TESTED, "0.21.9"):
        assert compat.peft_support(version) is None, version


def test_outside_the_range_says_which_way_and_names_the_range():
    assert "older" in compat.peft_support("0.14.0")
    newer = compat.peft_support("0.22.0")
    assert "newer" in newer and f"{compat.PEFT_OLDEST} to 0.21.x" in newer


def test_pyproject_floor_is_the_checked_floor():
    from pins import pins

    (spec,) = pins()["peft"]
    assert compat.PEFT_OLDEST in spec and str(spec) == f">={compat.PEFT_OLDEST}"


@pytest.fixture
def installed(monkeypatch):
    """Pretend another PEFT version is installed (the check runs once per process: reset around the test)."""

    def pretend(version: str) -> None:
        monkeypatch.setattr(peft, "__version__", version)
        compat.check_peft.cache_clear()

    yield pretend
    compat.check_peft.cache_clear()


def test_newer_peft_warns_once_at_save(installed, tmp_path):
    model = peft_model(LoraConfig(target_modules=["q_proj"]))
    installed("0.99.0")
    with pytest.warns(compat.NewerThanTestedWarning, match=r"peft 0\.99\.0 is newer .* 0\.21\.x"):
        shardsave.save_pretrained(model, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.NewerThanTestedWarning)
        shardsave.save_pretrained(model, tmp_path / "b")


def test_older_peft_is_refused_at_save(installed, tmp_path):
    model = peft_model(LoraConfig(target_modules=["q_proj"]))
    installed("0.14.0")
    with pytest.raises(compat.UnsupportedVersionError, match=r"peft 0\.14\.0 is older .*pip install 'peft>=0\.15"):
        shardsave.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
