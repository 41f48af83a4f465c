"""What a writer may remove: the hidden leftovers of writers that provably died, and the previous save's files
that a new save supersedes.

Everything shardsave writes before publishing it is hidden (`.<name>` + a mark) and starts with its writer's
owner tag (`shardsave.storage.owner`): `remove_stale_in` / `remove_stale` remove only what a process that
provably no longer runs left; a live, unknown or foreign owner's is kept. `superseded_weights` names the files
of a previous save that must not survive beside a new one (they would load instead of it).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from shardsave.plan.names import ADAPTER_FILES, CONFIG_NAME
from shardsave.storage.owner import Owner
from shardsave.storage.posix import rename_noreplace

__all__ = [
    "TMP_MARK",
    "OLD_MARK",
    "MODEL_WEIGHTS",
    "hidden_name",
    "create_hidden",
    "remove_stale_in",
    "remove_stale",
    "is_model_folder",
    "superseded_weights",
]

TMP_MARK = ".shardsave-tmp-"
OLD_MARK = ".shardsave-old-"
_UNIQUE = re.compile(r"[0-9a-f]{8}")  # what follows the owner tag in a hidden name

#: The weights files and indexes transformers reads from a model folder, variants (`model.fp16.safetensors`,
#: `model.safetensors.index.fp16.json`) and shards (`model-00001-of-00002.safetensors`) included.
MODEL_WEIGHTS = re.compile(
    r"(?:model|pytorch_model)(?:\..+?)?(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)"
    r"|(?:model\.safetensors|pytorch_model\.bin)\.index(?:\..+?)?\.json"
)


def hidden_name(parent: Path, prefix: str) -> Path:
    """`parent/<prefix><owner tag><8 hex digits>`: unique to this process, and removable once it is gone."""
    return parent / f"{prefix}{Owner.current().tag}{uuid.uuid4().hex[:8]}"


def create_hidden(parent: Path, prefix: str, create: Callable[[Path], None]) -> Path:
    """`create` a new hidden entry (see `hidden_name`); return its path."""
    while True:
        path = hidden_name(parent, prefix)
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def _stale(directory: Path, prefix: re.Pattern) -> list[os.DirEntry]:
    """The entries of `directory` named `prefix` + an owner tag + 8 hex digits whose owner is provably gone."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = prefix.match(entry.name)
        owner = Owner.parse(entry.name, match.end()) if match else None
        if owner and _UNIQUE.fullmatch(entry.name, owner[1]) and owner[0].gone():
            stale.append(entry)
    return stale


def remove_stale_in(directory: Path, prefix: re.Pattern) -> list[str]:
    """Remove the entries of `directory` named `prefix` + the owner tag of a process that provably no longer
    runs (what a killed writer left); return their names. Live, unknown and foreign owners' are kept."""
    removed = []
    for entry in _stale(directory, prefix):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def sibling_prefix(dest: Path, *marks: str) -> re.Pattern:
    """The names of `dest`'s hidden siblings with one of `marks` (`.<name><mark>`)."""
    return re.compile(rf"{re.escape(f'.{dest.name}')}(?:{'|'.join(re.escape(mark) for mark in marks)})")


def _mtime(entry: os.DirEntry) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def remove_stale(dest: Path) -> list[str]:
    """Remove the hidden siblings of `dest` that a writer left when it was killed mid-publish (its half-built
    directory, or the previous adapter it was swapping out); return their names. Only siblings are touched,
    never `dest`; and where `dest` is missing because the writer died between its two renames, the previous
    adapter it had moved aside is put back rather than removed."""
    marks = (TMP_MARK, OLD_MARK)
    if not os.path.lexists(dest):
        aside = [e for e in _stale(dest.parent, sibling_prefix(dest, OLD_MARK)) if e.is_dir(follow_symlinks=False)]
        if aside:
            latest = max(aside, key=_mtime)
            try:
                rename_noreplace(Path(latest.path), dest)
            except OSError:  # another process put it back, or published, first
                pass
            if not os.path.lexists(dest):  # it could not be put back: it stays where it is
                marks = (TMP_MARK,)
    return remove_stale_in(dest.parent, sibling_prefix(dest, *marks))


def is_model_folder(new: Path) -> bool:
    """The new save is a model's weights (a merged model), not an adapter: it writes them at its top level."""
    return any(MODEL_WEIGHTS.fullmatch(name) for name in os.listdir(new))


def superseded_weights(new: Path, old_names: Iterable[str]) -> list[str]:
    """The names of the previous save's files (`old_names`, one level of the old directory) that the new save
    in `new` supersedes, to be removed rather than kept beside it.

    A model folder (see `is_model_folder`) drops every weights file and index it does not write, and an
    adapter's files: transformers loads `model.safetensors` before `model.safetensors.index.json` and
    `pytorch_model.bin` where the safetensors are missing, and a folder with `adapter_config.json` as the base
    plus that adapter, so any of them left over would load the previous model. This is what transformers' own
    `save_pretrained` means by cleaning the folder, for every pattern rather than only its sharded files. An
    adapter folder (holding `adapter_config.json`) drops the weights file of the other format. Anything else
    (tokenizer, README, other folders) is kept."""
    if is_model_folder(new):
        stale = lambda name: MODEL_WEIGHTS.fullmatch(name) or name in ADAPTER_FILES  # noqa: E731
    elif (new / CONFIG_NAME).exists():
        stale = ADAPTER_FILES.__contains__
    else:
        return []
    return [name for name in old_names if stale(name) and not os.path.lexists(new / name)]
