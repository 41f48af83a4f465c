"""Rescue of the adapter from a checkpoint a training framework wrote (DeepSpeed ZeRO, torch DCP, accelerate's
FSDP files): `rescue_adapter` (`checkpoint`), reading only the adapter's bytes; planned from metadata alone where
that is provably what PEFT's skeleton would give (`fast`: neither peft nor transformers imported).

May import `shardsave.save`, `checks` and everything below."""

from shardsave.rescue.checkpoint import RescueError, rescue_adapter

__all__ = ["RescueError", "rescue_adapter"]
