"""Which framework checkpoint a folder holds (`detect_source`), and what its tensor names say (`key_format`).

`python -m shardsave.merge`, the rescue and `merge_into` are pointed at a folder: a shard set, a DeepSpeed save,
a DCP folder, accelerate's FSDP files, or Trainer's `checkpoint-N/` holding one. Recognised from the files'
names alone (each format's reader is imported only when used); `fsdp1_lora_gap` tells from a checkpoint's names
(no base model needed) that accelerate's FSDP1 adapter-only save lost the LoRA weights. Raises `RescueError`
(the error the rescue's users catch).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from shardsave.errors import RescueError
from shardsave.formats.shard_set import MANIFEST_NAME, SHARD_PATTERN
from shardsave.plan.names import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME
from shardsave.storage.reads import read_text

__all__ = [
    "FSDP_MODEL_DIR",
    "ADAPTER_PART",
    "FSDP1_CAUSE",
    "Source",
    "detect_source",
    "key_format",
    "fsdp1_lora_gap",
]

#: The folder accelerate (and so Trainer) writes an FSDP model's DCP checkpoint into (one per model).
FSDP_MODEL_DIR = re.compile(r"pytorch_model_fsdp_(\d+)$")
_CHECKPOINT_DIR = re.compile(r"checkpoint-\d+$")  # what Trainer names its checkpoint folders
#: Parameter-name components that only a PEFT adapter's tensors have.
ADAPTER_PART = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save|"
    r"trainable_tokens_delta)(\.|$)"
)
#: A key as PEFT saves it (`get_peft_model_state_dict`): the adapter's slot with no adapter name after it.
_PEFT_KEY = re.compile(
    r"\.(lora_A|lora_B)\.(weight|bias)$|\.(lora_embedding_A|lora_embedding_B|lora_magnitude_vector|"
    r"trainable_tokens_delta)$"
)

#: Why accelerate's FSDP1 adapter-only checkpoint holds no LoRA weight (named where one is found).
FSDP1_CAUSE = (
    "accelerate's save_fsdp_model(..., adapter_only=True), which Trainer calls for FSDP checkpoints, writes this "
    "under FSDP1: it passes the FSDP1 wrapper to PEFT's get_peft_model_state_dict, which then finds no LoRA "
    "weights (only the modules_to_save ones, if any)"
)


@dataclass(frozen=True, slots=True)
class Source:
    """What `python -m shardsave.merge` was pointed at, and where its data is."""

    kind: str  # "shards" | "deepspeed" | "dcp" | "fsdp" (accelerate's pytorch_model_fsdp*.bin)
    given: Path  # the path as passed
    path: Path  # the folder holding the data: the shard set, the DeepSpeed tag folder, the DCP folder

    def describe(self) -> str:
        what = {
            "shards": "a shardsave shard set",
            "deepspeed": "a DeepSpeed ZeRO checkpoint",
            "dcp": "a torch.distributed.checkpoint (DCP) folder",
            "fsdp": "accelerate's FSDP model file(s)",
        }[self.kind]
        if self.kind == "fsdp":
            from shardsave.formats.fsdp import fsdp_files

            files = [p.name for p in fsdp_files(self.path)]
            return f"{what} ({files[0]}{f' .. {files[-1]}' if len(files) > 1 else ''})"
        return what if self.path == self.given else f"{what} ({self.path.relative_to(self.given)})"


# --- what the source is -----------------------------------------------------------------------------------------


def _is_deepspeed(folder: Path) -> bool:
    return (folder / "latest").is_file() or any(folder.glob("*_model_states.pt"))


def detect_source(path: str | os.PathLike, *, tag: str | None = None) -> Source:
    """Recognise `path` from its files: a shard set (`manifest.json`), a DCP folder (`.metadata`), a DeepSpeed
    save (`latest`, or a tag folder of `*_model_states.pt`), accelerate's FSDP model files
    (`pytorch_model_fsdp.bin`, `pytorch_model_fsdp_0_rank<N>.bin`), or a Trainer / accelerate `checkpoint-N/`
    holding one of those (never its `adapter_model.*`, which may be the broken file being rescued)."""
    from shardsave.formats.deepspeed import checkpoint_dir
    from shardsave.formats.fsdp import fsdp_files

    given = Path(os.path.abspath(os.fspath(path)))
    if not given.exists():
        raise RescueError(f"{given}: does not exist.")
    if not given.is_dir():
        raise RescueError(f"{given}: a file; pass the folder that holds the checkpoint.")
    deepspeed = [given] if _is_deepspeed(given) else []
    deepspeed += [p for p in sorted(given.iterdir()) if p.is_dir() and any(p.glob("*_model_states.pt"))]
    if (given / MANIFEST_NAME).is_file() or any(SHARD_PATTERN.match(p.name) for p in given.iterdir()):
        kind, data = "shards", given  # an incomplete set too: the merge says what is missing
    elif (given / ".metadata").is_file():
        kind, data = "dcp", given
    elif deepspeed:
        kind, data = "deepspeed", _deepspeed_dir(given, tag, checkpoint_dir)
    else:
        dcp = sorted(p for p in given.iterdir() if p.is_dir() and (p / ".metadata").is_file())
        fsdp = sorted((p for p in dcp if FSDP_MODEL_DIR.match(p.name)), key=lambda p: int(p.name.rsplit("_", 1)[1]))
        if fsdp or len(dcp) == 1:
            kind, data = "dcp", (fsdp or dcp)[0]
        elif dcp:
            raise RescueError(
                f"{given}: holds several DCP checkpoints ({[p.name for p in dcp]}); pass the one of the model."
            )
        elif fsdp_files(given):
            kind, data = "fsdp", given
        else:
            raise RescueError(_not_a_source(given))
    if tag is not None and kind != "deepspeed":
        raise RescueError(f"{given}: --tag {tag!r} picks a DeepSpeed checkpoint tag, but this is {kind} data.")
    return Source(kind, given, data)


def _deepspeed_dir(given: Path, tag: str | None, checkpoint_dir: Callable) -> Path:
    try:
        return checkpoint_dir(given, tag)
    except ValueError as exc:
        raise RescueError(str(exc)) from None


def _not_a_source(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    checkpoints = [n for n in names if _CHECKPOINT_DIR.match(n)]
    if checkpoints:
        newest = max(checkpoints, key=lambda n: int(n.rsplit("-", 1)[1]))
        return (
            f"{folder}: a training output folder holding {len(checkpoints)} checkpoint folder(s); pass one of them, "
            f"e.g. {folder / newest} (the newest)."
        )
    if CONFIG_NAME in names or SAFETENSORS_NAME in names or BIN_NAME in names:
        return (
            f"{folder}: a PEFT adapter folder, with no framework checkpoint (DeepSpeed, DCP) or shard set to "
            f"rescue it from. Check it with `python -m shardsave.verify {folder}`; to rebuild it, pass the "
            f"checkpoint the training wrote (e.g. checkpoint-N/, holding global_stepN/ or pytorch_model_fsdp_0/)."
        )
    if not names:
        return (
            f"{folder}: empty: no shard set (manifest.json), DeepSpeed checkpoint or DCP folder. A save_shards "
            f"writing here did not finish (its manifest.json is written last): re-run it."
        )
    return (
        f"{folder}: neither a shardsave shard set (manifest.json), a DeepSpeed checkpoint (latest, "
        f"global_stepN/*_model_states.pt) nor a DCP folder (.metadata); it holds {names[:8]}."
    )


def key_format(names: Iterable[str]) -> str | None:
    """How a checkpoint names its adapter tensors (a pure function of the names): "model" (the PeftModel's
    parameter names, `...lora_A.<adapter>.weight`: DeepSpeed, DCP of the model's state dict, accelerate's FSDP2
    FULL_STATE_DICT), "peft" (PEFT's saved keys, `...lora_A.weight`, no adapter name, one adapter: what
    accelerate's `save_fsdp_model(..., adapter_only=True)` writes under SHARDED_STATE_DICT), or None when no name
    shows a LoRA slot (a full fine-tune, or PEFT-format `modules_to_save` tensors alone)."""
    model = peft = False
    for n in names:
        if _PEFT_KEY.search(n):
            peft = True
        elif ADAPTER_PART.search(n):
            model = True
    return "model" if model else "peft" if peft else None


def fsdp1_lora_gap(folder: str | os.PathLike) -> str | None:
    """What accelerate's FSDP1 adapter-only checkpoint in Trainer's `folder` (a checkpoint-N/) lacks, and why;
    None when the folder holds no such checkpoint. From the checkpoint's metadata and names alone (no base
    model needed): such a checkpoint names only PEFT-format `modules_to_save` tensors and no LoRA slot."""
    from shardsave.formats.dcp import canonical_keys, dcp_tensors
    from shardsave.formats.fsdp import ShardedTensorFileError, open_fsdp_files

    try:
        source = detect_source(folder)
        if source.kind == "fsdp":
            try:
                names = list(open_fsdp_files(source.path).tensors)
            except ShardedTensorFileError as exc:
                names = exc.keys
        elif source.kind == "dcp":
            names = list(dict.fromkeys(canonical_keys(dcp_tensors(source.path)).values()))
        else:
            return None
    except ValueError:
        return None
    if key_format(names) is not None or not all(n.startswith("base_model.model.") for n in names):
        return None
    try:
        targets = json.loads(read_text(Path(folder) / CONFIG_NAME)).get("target_modules")
    except (OSError, ValueError, AttributeError):
        targets = None
    if not targets:
        return None
    what = f"{len(names)} tensor(s), {sorted(names)[:3]} (in PEFT's key format), and" if names else "no tensor:"
    return (
        f"{source.path}: accelerate's FSDP checkpoint of the adapter holds {what} no LoRA tensor of its "
        f"target_modules {targets}. {FSDP1_CAUSE}. Resumed with "
        f"Trainer alone, this checkpoint restores none of the LoRA weights, and `python -m shardsave.merge` cannot "
        f"rescue the adapter from it."
    )
