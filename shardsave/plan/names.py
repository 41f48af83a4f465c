"""Parameter names: wrapper prefixes off, PEFT's rule for dropping the adapter name, and names that become paths.

Pure string functions, no torch. Every place that needs a model-independent name goes through
`canonical_name`, so a wrapper added by FSDP1, activation checkpointing or `torch.compile` never leaks
into a saved key. Every name that is joined to a directory (an adapter's folder, a shard file a manifest
lists, a weights file an index names) goes through `path_component`, so that a name read from a file cannot
write or read outside that directory. The file names of a PEFT adapter folder live here too: the format's writer
(`shardsave.formats.adapter_write`) and reader use them, and so does the storage, which must know which files a
new save supersedes.
"""

from __future__ import annotations

import ntpath
import re
from pathlib import Path

__all__ = [
    "SAFETENSORS_NAME",
    "BIN_NAME",
    "CONFIG_NAME",
    "CARD_NAME",
    "ADAPTER_FILES",
    "WRAPPER_COMPONENTS",
    "canonical_name",
    "is_under",
    "strip_adapter_name",
    "is_path_component",
    "path_component",
    "check_adapter_name",
    "adapter_dir",
]

#: The files of a PEFT adapter folder: the weights (safetensors or pickle), the config, the model card.
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
#: What a new adapter replaces in a folder: its weights in either format, and its config.
ADAPTER_FILES = frozenset({SAFETENSORS_NAME, BIN_NAME, CONFIG_NAME})

#: Name components that wrappers insert between a module and its children. They never belong to a
#: saved key: FSDP1 (`FullyShardedDataParallel`), activation checkpointing (`CheckpointWrapper`) and
#: `torch.compile` (`OptimizedModule`).
WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
_ANY_WRAPPER = re.compile("|".join(sorted(WRAPPER_COMPONENTS)))


def canonical_name(name: str) -> str:
    """`name` with every wrapper component removed (`a._fsdp_wrapped_module.b` -> `a.b`)."""
    if _ANY_WRAPPER.search(name) is None:
        return name  # the common case; called for every module of every save
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def is_under(name: str, prefixes: set[str] | frozenset[str]) -> bool:
    """`name` equals or lies below one of `prefixes`, on `.` boundaries (`a.b` covers `a.b.c`, not `a.bc`)."""
    while True:
        if name in prefixes:
            return True
        name, dot, _ = name.rpartition(".")
        if not dot:
            return False


def strip_adapter_name(key: str, adapter_name: str) -> str:
    """The checkpoint key for a model key: the adapter name removed, as PEFT's format defines it.

    A parameter held directly in a `ParameterDict` ends with the adapter name
    (`...trainable_tokens_delta.default`); a parameter of a module in a `ModuleDict` has it second to last
    (`...lora_A.default.weight`). Only those positions are touched, so a module that happens to share the
    adapter's name elsewhere in the path keeps it.
    """
    if "." not in key:
        return key
    suffix = f".{adapter_name}"
    if key.endswith(suffix):
        return key[: -len(suffix)]
    head, _, leaf = key.rpartition(".")
    head = re.sub(re.escape(suffix) + r"$", "", head)
    return f"{head}.{leaf}"


_BAD_NAME = re.compile(r"[/\\\x00]")


def is_path_component(name: object) -> bool:
    """`name` is one plain path component: a non-empty string, not `.` or `..`, without `/`, `\\` or NUL and
    without a drive (`C:`), so that `directory / name` is always an entry of `directory` itself."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and _BAD_NAME.search(name) is None
        and not ntpath.splitdrive(name)[0]
    )


def path_component(
    name: object, *, source: object, what: str = "adapter name", fix: str = "", error: type[ValueError] = ValueError
) -> str:
    """`name`, checked to be one plain path component (`is_path_component`), or `error` naming `source` (the
    file the name was read from, or the argument that gave it), the name and `fix`.

    Called wherever a name is joined to a directory: a name read from a file written elsewhere (`../x`, an
    absolute path) would otherwise write or read outside it."""
    if is_path_component(name):
        return name  # type: ignore[return-value]
    raise error(
        f"{source}: the {what} {name!r} cannot name a file or folder: it is joined to a directory, so it must be "
        f"one plain path component (not empty, '.' or '..', no '/', '\\', NUL or drive), or it would reach "
        f"outside that directory. Nothing was read or written for it. {fix or 'Rename it where it was set.'}"
    )


def check_adapter_name(adapter_name: str) -> None:
    """Raise `ValueError` if `adapter_name` cannot safely be a directory under the save directory.

    Non-default adapters are written to `save_directory/<adapter_name>/`; a name with a path separator or
    a `..` would write outside it.
    """
    if not is_path_component(adapter_name):
        raise ValueError(
            f"Adapter name {adapter_name!r} cannot be saved: non-default adapters are written to "
            f"save_directory/<adapter name>/, so the name must be a plain directory name without '/', '\\', "
            f"NUL, '.' or '..'. Rename the adapter (e.g. with a new `adapter_name` when loading it)."
        )


def adapter_dir(root: Path, adapter_name: str) -> Path:
    """Where PEFT puts an adapter: the root for `default`, a subdirectory named after it otherwise; `ValueError`
    for a name that is not one plain path component (`path_component`): every adapter written goes through
    here, whatever file its name came from, so none lands outside `root`."""
    if adapter_name == "default":
        return root
    return root / path_component(adapter_name, source=root, fix="Rename the adapter; nothing was written.")
