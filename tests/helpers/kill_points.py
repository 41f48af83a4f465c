"""Points at which a fault scenario kills its own rank (SIGKILL) in the middle of a save, by patching the step
that comes next (tests/scenarios/scenarios_faults.py)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def kill_self() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(point: str, stall: float = 60) -> None:
    """Make this process die by SIGKILL at `point` of the next save."""
    import shardsave.save.gathered as save_module
    import shardsave.save.shards as shards_module
    import shardsave.storage.local as writer_module
    from shardsave.ranks.collect.sharded import Transfer

    def before(owner, name):
        original = getattr(owner, name)

        def hook(*args, **kwargs):
            kill_self()
            return original(*args, **kwargs)

        setattr(owner, name, hook)

    if point == "gather":  # agreed, about to send its slices
        before(Transfer, "_send")
    elif point == "hang_gather":  # alive but stuck (a deadlock, a slow filesystem) before sending its slices
        original_send = Transfer._send

        def stuck(self, *args, **kwargs):
            time.sleep(stall)
            return original_send(self, *args, **kwargs)

        Transfer._send = stuck
    elif point == "weights":  # half of the weights file written in the hidden directory

        def partial(out, tensors, safe):
            (out / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
            kill_self()

        save_module.write_weights = partial
    elif point == "publish":  # everything written in the hidden directory, not yet swapped in
        before(writer_module, "fsync_tree")
    elif point == "swap":  # swapped in, the previous adapter not yet removed
        original = writer_module.rename_exchange

        def exchange_then_die(a, b):
            original(a, b)
            kill_self()

        writer_module.rename_exchange = exchange_then_die
    elif point == "shard_write":  # this rank's shard half written

        def partial_shard(path, *args, **kwargs):
            Path(path).write_bytes(b"\x00" * 1000)
            kill_self()

        shards_module.write_streaming = partial_shard
    elif point == "manifest":  # every shard written, the manifest not yet
        before(shards_module, "_atomic_write_text")
    elif point != "start":
        raise ValueError(point)
