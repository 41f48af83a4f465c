"""Who this process is in the job, and how long a rank waits for the others.

`Ranks` is this process's place in the default process group, read by the one rule in `shardsave.log`
(`process_rank`, which the logger's rank filter and prefix use too); `resolve_timeout` turns a call's `timeout=`
into seconds, bounded by the process group's own timeout (`group_timeout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from shardsave.log import logger, process_rank

__all__ = ["DEFAULT_TIMEOUT", "GROUP_SHARE", "Ranks", "resolve_timeout", "group_timeout"]

#: Seconds a rank waits for the others at each step of a save before it gives up, where the process group's
#: own timeout is not known (see `resolve_timeout`).
DEFAULT_TIMEOUT = 300.0

#: The default timeout's share of the process group's own timeout: shardsave's error comes before the group's.
GROUP_SHARE = 0.9


@dataclass(frozen=True, slots=True)
class Ranks:
    """This process's place in the default process group (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """This process's rank and world size, by the rule the logger's rank prefix uses too (`process_rank`)."""
        return cls(*process_rank())

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_timeout(timeout: float | None) -> float:
    """The save's timeout in seconds; warns (once per value) when the process group cannot honour it.

    None: 90% of the process group's own timeout (`init_process_group(timeout=)`; Trainer's `ddp_timeout`,
    1800 s by default), so that a save waits as long as the job's own collectives would and still fails with
    shardsave's error before the group's watchdog ends the job; `DEFAULT_TIMEOUT` where torch does not expose it.
    """
    if timeout is None:
        own = group_timeout()
        return DEFAULT_TIMEOUT if own is None else GROUP_SHARE * own
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    timeout = float(timeout)
    own = group_timeout()
    if own is not None and timeout > own and (timeout, own) not in _warned:
        _warned.add((timeout, own))
        logger.warning(
            "shardsave: timeout=%g s exceeds the process group's own timeout of %g s: a gather that waits that "
            "long is ended by the process group first (on NCCL its watchdog aborts the communicator and the job). "
            "Pass a timeout below %g s, or create the process group with a longer timeout.",
            timeout,
            own,
            own,
        )
    return timeout


_warned: set[tuple[float, float]] = set()


def group_timeout() -> float | None:
    """The default process group's own collective timeout in seconds, where torch exposes it."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD
    for device in getattr(group, "_device_types", ()):
        try:
            return group._get_backend(device).options._timeout.total_seconds()
        except (AttributeError, RuntimeError):
            continue
    return None
