"""Rescue of the adapter from a checkpoint a training framework wrote (DeepSpeed ZeRO, torch DCP, accelerate's
FSDP files): `rescue_adapter` (`checkpoint`), reading only the adapter's bytes; planned from metadata alone where
that is provably what PEFT's skeleton would give (`fast`: neither peft nor transformers imported).

May import `shardsave.save`, `checks` and everything below."""

from shardsave.formats.hf_model import DTYPES
from shardsave.rescue.checkpoint import (
    RescueError,
    Source,
    align_names,
    callback_adapter,
    detect_source,
    fsdp1_lora_gap,
    key_format,
    rescue_adapter,
)

# the names `shardsave.rescue` (one module before the redesign) gave
__all__ = [
    "RescueError",
    "Source",
    "DTYPES",
    "detect_source",
    "align_names",
    "key_format",
    "fsdp1_lora_gap",
    "callback_adapter",
    "rescue_adapter",
]
