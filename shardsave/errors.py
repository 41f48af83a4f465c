"""The exceptions shardsave raises for users to catch, in one place.

Every module raises from here, so `except shardsave.errors.X` catches X wherever it comes from; the modules that
raised them before (`shardsave.ranks.rendezvous.SaveError`, ...) still re-export them. The base classes are the
standard ones a caller would guess (`ValueError` for bad input, `RuntimeError` for a failed distributed run), and
every message names the input, the problem and the fix. Imports nothing from shardsave."""

from __future__ import annotations

__all__ = [
    "SaveError",
    "MissingRanksError",
    "RemoteError",
    "TransferError",
    "UnsupportedPartitionError",
    "StageError",
    "AdapterFilesError",
    "ShardSetError",
    "DCPError",
    "UnsafeMetadataError",
    "DeepSpeedCheckpointError",
    "UnsafeCheckpointError",
    "FSDPFileError",
    "ShardedTensorFileError",
    "VerifyError",
    "SkeletonError",
    "AdapterMismatchError",
    "RescueError",
    "MergedError",
    "MergeRefused",
    "UnsupportedVersionError",
    "NewerThanTestedWarning",
]


# Distributed operations (every rank raises the same one)


class SaveError(RuntimeError):
    """A distributed save could not complete; raised on every rank that took part."""


class MissingRanksError(SaveError):
    """Some ranks did not reach the save in time (typically: only rank 0 called it)."""

    def __init__(self, message: str, missing: tuple[int, ...]):
        super().__init__(message)
        self.missing = missing


class RemoteError(SaveError):
    """Another rank failed; its error is carried in the message."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


class TransferError(RuntimeError):
    """A point-to-point exchange of the gather failed or did not finish in time (a peer died or hangs)."""


class UnsupportedPartitionError(NotImplementedError):
    """A ZeRO-3 parameter is partitioned in a way shardsave cannot prove it reads correctly."""


class StageError(ValueError):
    """The ranks' parts do not add up to one model."""


# Files and checkpoints that cannot be read (the message names the file and the problem)


class AdapterFilesError(ValueError):
    """The adapter cannot be read from `path`; the message names the file and the problem."""


class ShardSetError(ValueError):
    """The shard set is incomplete, inconsistent or damaged; the message names the file and the problem."""


class DCPError(ValueError):
    """The DCP folder is missing a file, damaged, or lacks a requested key; the message names which."""


class UnsafeMetadataError(DCPError):
    """`.metadata` refers to something other than DCP's metadata classes; it was not executed."""


class DeepSpeedCheckpointError(ValueError):
    """The DeepSpeed checkpoint is missing a file, damaged, or lacks a requested parameter; the message says which."""


class UnsafeCheckpointError(DeepSpeedCheckpointError):
    """A checkpoint file refers to a type outside the allowlist; nothing of it was executed."""


class FSDPFileError(ValueError):
    """An FSDP model file is missing, unreadable or holds what cannot be read safely; the message says which."""


class ShardedTensorFileError(FSDPFileError):
    """An FSDP1 rank file of ShardedTensors, refused; `keys`: the parameter names its pickle spells out."""

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys


class VerifyError(ValueError):
    """The adapter cannot be read at all (no config, corrupt or truncated file, a refused pickle)."""


class SkeletonError(ValueError):
    """The base model's config cannot be found or read, or PEFT cannot apply the adapter config to it."""


# Operations refused before anything is written


class AdapterMismatchError(ValueError):
    """The saved adapter does not fit the model's adapter (config, keys, shapes or dtypes)."""


class RescueError(ValueError):
    """The source, the adapter config or the base cannot give the adapter; the message names what and why.
    Nothing was written."""


class MergedError(ValueError):
    """The adapter, the base or the output cannot give the merged model; the message names what, why and the fix.
    Nothing was written."""


class MergeRefused(ValueError):
    """The adapter cannot be merged exactly (PEFT cannot, or shardsave does not); the message names what."""


# Library versions


class UnsupportedVersionError(ImportError):
    """An installed library is older than shardsave supports."""


class NewerThanTestedWarning(UserWarning):
    """An installed library is newer than any release shardsave was tested with."""
