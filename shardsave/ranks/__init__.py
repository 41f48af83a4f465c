"""Ranks: who this process is (`identity`), the agreement through the store that never hangs (`rendezvous`), the
writer's heartbeat (`heartbeat`), the one handshake every shardsave call runs (`handshake`: plan, agree, restage,
gather, the writer's end), replica fingerprints (`replicas`) and the collectors, one per way of holding parameters,
with the transfer executor (`collect`).

The only layer that runs collectives. May import `shardsave.formats`, `storage`, `tensors`, `plan` and the bottom
modules (`errors`, `log`, `compat`)."""
