"""The public import paths, pinned: every name users import, the object it is, the exceptions' bases, the public
functions' parameters, and the two commands' usage text (captured from the tree before the redesign, e1daab4).
A name added, dropped, moved to another object or given another parameter fails here; change the pin only with
the change of the public API it records."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import shardsave
import shardsave.errors
import shardsave.integrations
import shardsave.merge
import shardsave.rescue
import shardsave.verify

ROOT = Path(__file__).resolve().parents[2]
P, K, VK = "POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY", "VAR_KEYWORD"
NO = inspect.Parameter.empty

ALL = [
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
MERGE_ALL = ["ShardSetError", "ShardSet", "read_shard_set", "merge_shards", "default_output", "main"]
VERIFY_ALL = ["VerifyError", "Finding", "AdapterSummary", "Report", "KINDS", "check_tensors", "warn_findings",
              "verify_adapter", "main"]  # fmt: skip
# the module shardsave.rescue was, on e1daab4
RESCUE_ALL = ["RescueError", "Source", "DTYPES", "detect_source", "align_names", "key_format", "fsdp1_lora_gap",
              "callback_adapter", "rescue_adapter"]  # fmt: skip
INTEGRATIONS_ALL = ["ShardSaveCallback", "save_with_accelerator", "main_process_of", "trainer_writer",
                    "trainer_checkpoint_dir", "agreed_checkpoint_dir"]  # fmt: skip

#: exception -> its direct base, as users catch them (shardsave.errors holds them all)
BASES = {
    "SaveError": RuntimeError,
    "MissingRanksError": "SaveError",
    "RemoteError": "SaveError",
    "TransferError": RuntimeError,
    "UnsupportedPartitionError": NotImplementedError,
    "StageError": ValueError,
    "AdapterFilesError": ValueError,
    "ShardSetError": ValueError,
    "DCPError": ValueError,
    "UnsafeMetadataError": "DCPError",
    "DeepSpeedCheckpointError": ValueError,
    "UnsafeCheckpointError": "DeepSpeedCheckpointError",
    "FSDPFileError": ValueError,
    "ShardedTensorFileError": "FSDPFileError",
    "VerifyError": ValueError,
    "SkeletonError": ValueError,
    "AdapterMismatchError": ValueError,
    "RescueError": ValueError,
    "MergedError": ValueError,
    "MergeRefused": ValueError,
    "UnsupportedVersionError": ImportError,
    "NewerThanTestedWarning": UserWarning,
}

#: public callable -> [(parameter, kind, default)], read with inspect.signature on the tree before the redesign
SIGNATURES = {
    "shardsave.save_pretrained": [
        ("model", P, NO), ("save_directory", P, NO), ("safe_serialization", K, True), ("selected_adapters", K, None),
        ("save_embedding_layers", K, "auto"), ("is_main_process", K, None),
        ("path_initial_model_for_weight_conversion", K, None), ("allow_pickle", K, False), ("timeout", K, None),
        ("replace_files_only", K, False),
    ],
    "shardsave.gather_state_dict": [
        ("model", P, NO), ("keep", K, None), ("is_main_process", K, None), ("timeout", K, None),
    ],
    "shardsave.save_shards": [
        ("model", P, NO), ("shards_directory", P, NO), ("selected_adapters", K, None),
        ("save_embedding_layers", K, "auto"), ("timeout", K, None), ("shared_filesystem", K, True),
    ],
    "shardsave.load_pretrained": [
        ("model", P, NO), ("path", P, NO), ("adapter_name", K, "default"), ("strict", K, True), ("timeout", K, None),
        ("allow_pickle", K, False),
    ],
    "shardsave.save_merged": [
        ("model", P, NO), ("save_directory", P, NO), ("selected_adapters", K, None), ("max_shard_size", K, "5GB"),
        ("safe_serialization", K, True), ("dtype", K, None), ("is_main_process", K, None), ("timeout", K, None),
        ("parallel_write", K, None),
    ],
    "shardsave.rescue_adapter": [
        ("source", P, NO), ("output", P, NO), ("adapter_config", K, None), ("base", K, None), ("dtype", K, "auto"),
        ("tag", K, None), ("safe_serialization", K, True), ("allow_pickle", K, False), ("overwrite", K, False),
    ],
    "shardsave.merge_into": [
        ("source", P, NO), ("base", P, NO), ("output", P, NO), ("selected_adapters", K, None), ("dtype", K, "auto"),
        ("max_shard_size", K, "5GB"), ("allow_pickle", K, False), ("overwrite", K, False),
    ],
    "shardsave.merge_shards": [
        ("shards_directory", P, NO), ("output_directory", P, None), ("safe_serialization", K, True),
        ("path_initial_model_for_weight_conversion", K, None), ("allow_pickle", K, False), ("overwrite", K, False),
        ("progress", K, None),
    ],
    "shardsave.enable_logging": [("level", P, "INFO")],
    "shardsave.integrations.ShardSaveCallback": [
        ("shards", K, False), ("resume", K, True), ("timeout", K, None), ("save_kwargs", VK, NO),
    ],
    "shardsave.integrations.save_with_accelerator": [
        ("accelerator", P, NO), ("model", P, NO), ("save_directory", P, NO), ("kwargs", VK, NO),
    ],
    "shardsave.verify.verify_adapter": [
        ("path", P, NO), ("base", K, None), ("allow_pickle", K, False), ("checkpoint_notes", K, True),
    ],
    "shardsave.verify.check_tensors": [("adapter_name", P, NO), ("config", P, NO), ("tensors", P, NO)],
    "shardsave.merge.main": [("argv", P, None)],
    "shardsave.verify.main": [("argv", P, None)],
}  # fmt: skip

MERGE_HELP = """\
usage: python -m shardsave.merge [-h] [-o OUTPUT]
                                 [--adapter-config ADAPTER_CONFIG]
                                 [--base BASE]
                                 [--dtype {auto,float32,bfloat16,float16}]
                                 [--into BASE]
                                 [--max-shard-size MAX_SHARD_SIZE]
                                 [--selected-adapters NAME [NAME ...]]
                                 [--tag TAG]
                                 [--initial-adapter INITIAL_ADAPTER]
                                 [--allow-pickle] [--bin] [--overwrite]
                                 [--no-progress]
                                 SRC [SRC ...]

Write the adapter directory PeftModel.save_pretrained would write
(adapter_model.safetensors, adapter_config.json, README.md) from the per-rank
shards of shardsave.save_shards, or rescue it from a DeepSpeed ZeRO or
torch.distributed.checkpoint (DCP / FSDP) checkpoint, or a Trainer
checkpoint-N/ holding one, reading only the adapter's bytes.

positional arguments:
  SRC                   a shard set (holds manifest.json), a DeepSpeed save
                        folder (holds latest) or tag folder, a DCP folder
                        (holds .metadata), or a Trainer / accelerate
                        checkpoint-N/ folder holding one of them; several
                        shard folders for a set written to node-local disks
                        (one per node, copied back)

options:
  -h, --help            show this help message and exit
  -o OUTPUT, --output OUTPUT
                        adapter directory to write (default: next to SRC, SRC-
                        merged)
  --adapter-config ADAPTER_CONFIG
                        checkpoints: adapter_config.json, or a folder of
                        adapters as PEFT saves them (default: found in SRC or
                        its parent)
  --base BASE           checkpoints: the base model's folder (its config.json)
                        or a Hub id in the local cache (default: the adapter
                        config's base_model_name_or_path); its structure is
                        built without weights
  --dtype {auto,float32,bfloat16,float16}
                        checkpoints: dtype of the written tensors (auto: what
                        the model trained in)
  --into BASE           merge the adapter into this base model (a local
                        Hugging Face folder) and write the merged full
                        weights, as PEFT's
                        merge_and_unload().save_pretrained(OUT) would; SRC may
                        then be an adapter folder too
  --max-shard-size MAX_SHARD_SIZE
                        --into: the largest weights file (as
                        save_pretrained's, default 5GB)
  --selected-adapters NAME [NAME ...]
                        --into: adapters of a folder saved with several,
                        merged together in this order (default: the root one)
  --tag TAG             DeepSpeed: the tag to read (default: the one `latest`
                        names)
  --initial-adapter INITIAL_ADAPTER
                        initial PiSSA/CorDA/OLoRA adapter, to convert to plain
                        LoRA
  --allow-pickle        read an initial adapter saved as adapter_model.bin
                        (with torch.load(weights_only=True)); DeepSpeed: load
                        checkpoint files that refer to types outside the
                        allowlist (only for files you trust)
  --bin                 write adapter_model.bin instead of .safetensors
  --overwrite           replace an existing output directory
  --no-progress         no progress bar (default: shown on a terminal)

Exit status: 0 written; 2 the source or the output is not acceptable (nothing
written); 1 writing failed (disk full, unwritable; nothing published) or an
unexpected error.
"""

VERIFY_HELP = """\
usage: python -m shardsave.verify [-h] [--base BASE] [--json] [--allow-pickle]
                                  path

Check a saved PEFT adapter folder (and its subfolders for non-default
adapters) for empty, sliced, all-zero, non-finite or misshapen tensors, keys
PEFT would not load, and (with --base) tensors the base model needs. Reads one
tensor at a time; nothing is written or downloaded.

positional arguments:
  path            the adapter folder (holds adapter_config.json)

options:
  -h, --help      show this help message and exit
  --base BASE     base model: a local folder with config.json, or a Hub id in
                  the local cache
  --json          print a machine-readable report on stdout
  --allow-pickle  read an adapter_model.bin (with
                  torch.load(weights_only=True)); refused otherwise

Exit status: 0 sound; 1 problems found (each named with its key); 2 unreadable
(no config, a truncated or corrupt file, a refused pickle, a base that cannot
be found).
"""


def resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(sys.modules[module], name)


def test_all_is_pinned():
    assert shardsave.__all__ == ALL
    assert shardsave.merge.__all__ == MERGE_ALL
    assert shardsave.verify.__all__ == VERIFY_ALL
    assert shardsave.integrations.__all__ == INTEGRATIONS_ALL
    assert shardsave.rescue.__all__ == RESCUE_ALL
    for module, names in ((shardsave, ALL), (shardsave.merge, MERGE_ALL), (shardsave.verify, VERIFY_ALL),
                          (shardsave.integrations, INTEGRATIONS_ALL), (shardsave.rescue, RESCUE_ALL)):  # fmt: skip
        for name in names:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    assert "rescue_adapter" in dir(shardsave) and "SaveError" in dir(shardsave)


@pytest.mark.parametrize("name", sorted(BASES))
def test_exceptions_live_in_errors_with_their_bases(name):
    cls = getattr(shardsave.errors, name)
    base = BASES[name]
    base = getattr(shardsave.errors, base) if isinstance(base, str) else base
    assert cls.__bases__ == (base,), cls.__mro__
    assert name in shardsave.errors.__all__


def test_errors_module_holds_only_exceptions():
    for name in shardsave.errors.__all__:
        cls = getattr(shardsave.errors, name)
        assert isinstance(cls, type) and issubclass(cls, Exception | Warning), name
        assert cls.__module__ == "shardsave.errors", name


def test_users_catch_the_standard_bases():
    assert issubclass(shardsave.SaveError, RuntimeError)
    for cls in (shardsave.MissingRanksError, shardsave.RemoteError):
        assert issubclass(cls, shardsave.SaveError)
    for cls in (shardsave.ShardSetError, shardsave.RescueError, shardsave.MergedError):
        assert issubclass(cls, ValueError)


def test_each_public_name_is_one_object_everywhere():
    for name in ("SaveError", "MissingRanksError", "RemoteError", "ShardSetError", "RescueError", "MergedError"):
        assert getattr(shardsave, name) is getattr(shardsave.errors, name), name
    assert shardsave.merge.ShardSetError is shardsave.errors.ShardSetError
    assert shardsave.verify.VerifyError is shardsave.errors.VerifyError
    assert shardsave.merge.merge_shards is shardsave.merge_shards
    assert shardsave.rescue.rescue_adapter is shardsave.rescue_adapter
    assert shardsave.rescue.RescueError is shardsave.RescueError
    assert issubclass(shardsave.LoadResult, tuple) and shardsave.LoadResult._fields == (
        "missing_keys",
        "unexpected_keys",
    )
    assert isinstance(shardsave.integrations.ShardSaveCallback, type)
    for name in ("save_with_accelerator", "main_process_of"):
        assert callable(getattr(shardsave.integrations, name)), name
    for name in ("verify_adapter", "check_tensors", "warn_findings", "main"):
        assert callable(getattr(shardsave.verify, name)), name
    for name in ("read_shard_set", "default_output", "main"):
        assert callable(getattr(shardsave.merge, name)), name


@pytest.mark.parametrize("dotted", sorted(SIGNATURES))
def test_signature_is_pinned(dotted):
    target = resolve(dotted)
    signature = inspect.signature(target.__init__ if isinstance(target, type) else target)
    params = [p for p in signature.parameters.values() if p.name != "self"]
    assert [(p.name, p.kind.name, p.default) for p in params] == SIGNATURES[dotted]


@pytest.mark.parametrize("command, expected", [("merge", MERGE_HELP), ("verify", VERIFY_HELP)])
def test_help_is_what_it_was(command, expected):
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(ROOT))
    env.pop("PYTHON_COLORS", None)
    proc = subprocess.run(
        [sys.executable, "-m", f"shardsave.{command}", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected
