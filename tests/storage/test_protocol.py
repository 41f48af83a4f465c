"""The storage seam: the local implementation provides every operation the protocol declares, with the same
signature, and the one refusal of an existing destination reads the same for every offline writer."""

from __future__ import annotations

import inspect

import pytest

from shardsave.storage.base import Storage
from shardsave.storage.local import LocalStorage, check_overwrite


def _declared() -> list[str]:
    return [name for name, value in vars(Storage).items() if callable(value) and not name.startswith("_")]


def test_local_storage_is_a_storage():
    assert isinstance(LocalStorage(), Storage)


@pytest.mark.parametrize("name", _declared())
def test_signatures_match_the_protocol(name):
    declared = inspect.signature(getattr(Storage, name))
    params = list(declared.parameters.values())[1:]  # without self
    implemented = inspect.signature(getattr(LocalStorage(), name))
    assert [(p.name, p.kind) for p in params] == [(p.name, p.kind) for p in implemented.parameters.values()]


def test_nothing_implemented_beyond_the_protocol():
    implemented = {name for name in vars(LocalStorage) if not name.startswith("_")}
    assert implemented == set(_declared())


def test_refusal_of_an_existing_destination(tmp_path):
    check_overwrite(tmp_path / "missing", False, RuntimeError)
    check_overwrite(tmp_path, True, RuntimeError)
    with pytest.raises(RuntimeError, match=r"already exists; pass overwrite=True \(--overwrite\) to replace it\.$"):
        check_overwrite(tmp_path, False, RuntimeError)
    with pytest.raises(ValueError) as info:
        check_overwrite(tmp_path, False, ValueError, replaced="its adapter files (nothing else in it is touched).")
    assert str(info.value) == (
        f"{tmp_path}: already exists; pass overwrite=True (--overwrite) to replace its adapter files (nothing else "
        f"in it is touched)."
    )
