"""Ranks: who this process is, the agreement through the store that never hangs and the writer's heartbeat
(`rendezvous`), replica fingerprints (`replicas`) and the collectors, one per way of holding parameters, with the
transfer executor (`collect`).

The only layer that runs collectives. May import `shardsave.formats`, `storage`, `tensors`, `plan` and the bottom
modules (`errors`, `log`, `compat`)."""
