"""Benchmark: bytes that one save's agreement puts through the store, at 64-1024 simulated ranks.

    python benchmarks/store_bytes.py                        # this checkout (about 1 min on 2 cores)
    git worktree add /tmp/before 495454e                    # the code before (issue 23, item 13)
    python benchmarks/store_bytes.py --tree /tmp/before     # the same, measured on that code

N threads, one `Rendezvous` each over one `HashStore` that counts the bytes every rank sets and reads and the
bytes held at every moment, run `shardsave.ranks.handshake.start` (the start of `save_pretrained`, `save_shards` and
`gather_state_dict`) on what each rank of a layout reports: the fingerprints of the runs it holds copies of
(HSDP: shards of 8 ranks, the rest replicas) and, for pipeline stages, its part (8 stages, the ranks of each
stage data-parallel under DDP, or FSDP). The adapter: Llama-7B-shaped, LoRA r=16 on all 7 projections of 32
layers (448 tensors), under PEFT's names. What follows the start (the gather, "done") moves the same bytes
before and after and is left out.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip
LAYERS, R, HIDDEN, INTERMEDIATE = 32, 16, 4096, 11008
SHARD = 8  # HSDP: ranks per shard group (one node)
STAGES = 8


def tensors() -> dict[str, tuple[int, int]]:
    """PEFT's parameter names and (rows, cols) of the adapter, in model order."""
    out = {}
    for i in range(LAYERS):
        for proj, block in PROJECTIONS.items():
            rows = INTERMEDIATE if proj in ("gate_proj", "up_proj") else HIDDEN
            cols = INTERMEDIATE if proj == "down_proj" else HIDDEN
            prefix = f"base_model.model.model.layers.{i}.{block}.{proj}"
            out[f"{prefix}.lora_A.default.weight"] = (R, cols)
            out[f"{prefix}.lora_B.default.weight"] = (rows, R)
    return out


def chunks(rows: int, parts: int) -> list[tuple[int, int]]:
    size = -(-rows // parts)
    return [(min(i * size, rows), min((i + 1) * size, rows)) for i in range(parts)]


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]  # what the copies' bytes give: equal on every copy


class Bytes:
    """The shared store's books: bytes set and read per rank, bytes held now and at the peak."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held: dict[str, int] = {}
        self.now = self.peak = 0
        self.set = Counter()
        self.read = Counter()

    def put(self, rank: int, key: str, nbytes: int) -> None:
        with self.lock:
            self.set[rank] += nbytes
            self.now += nbytes - self.held.get(key, 0)
            self.held[key] = nbytes
            self.peak = max(self.peak, self.now)

    def drop(self, key: str) -> None:
        with self.lock:
            self.now -= self.held.pop(key, 0)


class View:
    """One rank's handle on the shared store, booking what it sets, reads and deletes."""

    def __init__(self, store, books: Bytes, rank: int):
        self._store, self._books, self._rank = store, books, rank

    def set(self, key, value):
        self._books.put(self._rank, key, len(value))
        return self._store.set(key, value)

    def get(self, key):
        value = self._store.get(key)
        self._books.read[self._rank] += len(value)
        return value

    def multi_get(self, keys):
        values = self._store.multi_get(keys)
        self._books.read[self._rank] += sum(len(v) for v in values)
        return values

    def add(self, key, amount):
        value = self._store.add(key, amount)
        self._books.put(self._rank, key, 8) if amount else None
        return value

    def delete_key(self, key):
        self._books.drop(key)
        return self._store.delete_key(key)

    def wait(self, keys, timeout):
        return self._store.wait(keys, timeout)

    def check(self, keys):
        return self._store.check(keys)


@dataclass
class Report:
    """What a rank reports at the start (the request `shardsave.ranks.handshake.start` reads)."""

    args: dict
    decided: dict | None
    replicas: dict
    stage_view: dict | None = None
    union: dict | None = field(default=None)

    def view(self) -> dict:
        return self.stage_view

    def restage(self, union: dict, writer: int, ranks) -> None:
        self.union = union


def hsdp(rank: int, n: int, grouped: bool, drift: tuple[int, int] | None = None) -> tuple[dict, dict | None]:
    """HSDP: rank `rank` holds dim-0 chunk `rank % SHARD` of every tensor, as do its replicas. `drift`: (rank,
    tensor index) whose copy differs from its replicas'."""
    j = rank % SHARD
    prints = {}
    for index, (name, (rows, cols)) in enumerate(tensors().items()):
        a, b = chunks(rows, SHARD)[j]
        if b > a:
            drifted = drift == (rank, index)
            prints[f"{name}@{a * cols}"] = fingerprint(f"{name}@{a * cols}" + ("drifted" if drifted else ""))
    if not grouped:
        return prints, None
    from shardsave.ranks.replicas import group_id

    return {group_id(tuple(range(j, n, SHARD))): prints}, None


def stage_view(rank: int, n: int, inner: str) -> dict:
    """Pipeline stage `rank // (n / STAGES)` of LAYERS / STAGES layers; DDP inside (every rank holds its stage's
    tensors whole) or FSDP (dim-0 chunks over the stage's ranks)."""
    per_stage = n // STAGES
    stage, member = divmod(rank, per_stage)
    layers = range(stage * LAYERS // STAGES, (stage + 1) * LAYERS // STAGES)
    view, entries = {}, []
    for name, (rows, cols) in tensors().items():
        if int(name.split(".")[4]) not in layers:
            continue
        a, b = (0, rows) if inner == "ddp" else chunks(rows, per_stage)[member]
        held = [[a * cols, b * cols, fingerprint(f"{name}@{a}")]] if b > a else []
        view[name] = [[rows, cols], "bfloat16", True, held]
        entries.append([name.replace(".default", ""), name])
    return {"tensors": view, "entries": {"default": {"0": entries, "1": entries}}}


def simulate(layout: str, n: int, drift: tuple[int, int] | None = None) -> dict:
    """One start of a save at `n` ranks (threads) of `layout`: the store's books, each rank's error (`errors`,
    empty when the save may go on) and the union rank 1 follows (pipeline layouts)."""
    import torch.distributed as dist

    try:  # this checkout: the handshake, over requests that declare its contract
        from shardsave.ranks.handshake import WriterRequest, start
        from shardsave.ranks.identity import Ranks
        from shardsave.ranks.rendezvous import Rendezvous

        made = type("Report", (Report, WriterRequest), {})
    except ImportError:  # the code before it (--tree): agree_start in the save module, the report duck-typed
        from shardsave.ranks.rendezvous import Ranks, Rendezvous
        from shardsave.save.gathered import agree_start

        made = Report

        def start(rdv, prepare, main):
            return agree_start(rdv, rdv.ranks, prepare, main)

    grouped = hasattr(importlib.import_module("shardsave.ranks.replicas"), "digests")  # the code after item 13
    store, books = dist.HashStore(), Bytes()
    args = {"save_directory": "/checkpoints/step-1000", "safe_serialization": True, "selected_adapters": ["default"],
            "save_embedding_layers": "auto", "configs": "0123456789abcdef", "initial": None}  # fmt: skip
    decided = {"destination": "/checkpoints/step-1000", "embeddings": {"default": False}}
    errors: dict[int, BaseException] = {}
    reports: dict[int, Report] = {}

    def prepare(rank: int) -> Report:
        if layout == "HSDP":
            replicas, view, plan = *hsdp(rank, n, grouped, drift), "same"
        else:
            replicas, view = {}, stage_view(rank, n, "ddp" if layout == "pipeline x DDP" else "fsdp")
            plan = f"stage{rank // (n // STAGES)}"
        reports[rank] = made({**args, "plan": plan}, decided if rank == 0 else None, replicas, view)
        return reports[rank]

    def rank_main(rank: int) -> None:
        try:
            rdv = Rendezvous(Ranks(rank, n), op="bench", timeout=120, store=View(store, books, rank), generation=0)
            start(rdv, lambda is_main: prepare(rank), rank == 0)
        except BaseException as exc:  # reported after the join
            errors[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    others = [books.read[r] for r in range(1, n)]
    return {"layout": layout, "n": n, "set": sum(books.set.values()), "peak": books.peak, "left": books.now,
            "read0": books.read[0], "read_other": max(others), "read_all": sum(books.read.values()),
            "errors": errors, "union": reports[1].union}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to measure")
    parser.add_argument("--ranks", default="64,256,512,1024")
    parser.add_argument("--layouts", default="HSDP,pipeline x DDP,pipeline x FSDP")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    import shardsave

    print(f"shardsave from {Path(shardsave.__file__).parent}\n")
    print("| layout | N | set in all | peak held | left after the call | read by rank 0 | read by another rank "
          "(max) | read in all |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for layout in args.layouts.split(","):
        for n in map(int, args.ranks.split(",")):
            row = simulate(layout, n)
            if row.pop("errors"):
                raise RuntimeError(f"{layout} at {n} ranks: the agreement failed")
            rows.append({k: v for k, v in row.items() if k != "union"})
            print(f"| {layout} | {n} | " + " | ".join(_size(row[k]) for k in
                  ("set", "peak", "left", "read0", "read_other", "read_all")) + " |", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows))


def _size(nbytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


if __name__ == "__main__":
    main()
