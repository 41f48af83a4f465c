"""Rescue of the adapter from a checkpoint a training framework wrote (DeepSpeed ZeRO, torch DCP, accelerate's
FSDP files): `rescue_adapter` (`checkpoint`), reading only the adapter's bytes.

May import `shardsave.save`, `checks` and everything below."""

from shardsave.rescue.checkpoint import RescueError, rescue_adapter

__all__ = ["RescueError", "rescue_adapter"]
