"""Benchmark: what one gathered save costs as the number of ranks grows, simulated at 64-1024 ranks and real
at 2, 4 and 8.

    python benchmarks/rank_count.py                    # everything (about 3 min on 2 cores)
    python benchmarks/rank_count.py --quick            # a smaller model, 2 and 8 real ranks (about 2 min)
    python benchmarks/rank_count.py --parts plan,agree # the simulated parts only (seconds)

1. plan: a Llama-7B-shaped LoRA (32 layers, q/k/v/o/gate/up/down, r=16, bf16: 76 MiB) laid out as each backend
   lays it out at N ranks, through `shardsave.plan.ranges.plan_transfer` (pure, what the gather executes), against
   the previous gather (one `dist.gather` per round of every rank's widest buffer), modelled below.
2. agree: N threads, one `Rendezvous` each on one shared `HashStore` wrapped to count calls per rank, doing
   what `save_pretrained` does on the store, for two saves in a row (the second deletes the first's keys);
   against the previous agreement, where every rank read every rank's key (counted analytically).
3. real: `benchmarks/gathered_save.py --paths shardsave` under torchrun with 2, 4 and 8 gloo ranks, FSDP2 and
   ZeRO-3: median save time and the writer's peak extra resident memory (a separate call).
4. load: `load_pretrained` of the same adapter at N ranks, from a shard set saved by ZeRO-3 at N ranks and from a
   save_pretrained folder: files opened and bytes read per rank and in all, counted over metadata (which runs
   each rank's range meets, the shard headers' sizes, the real index `shard_index` posts), against the reader
   before it verified once and kept descriptors open (495454e), modelled below.
   `python benchmarks/rank_count.py --parts load` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch.distributed as dist  # noqa: E402

import shardsave.ranks.rendezvous as ranks_module  # noqa: E402
from shardsave.plan.ranges import Slice, chunk_ranges, plan_transfer  # noqa: E402
from shardsave.ranks.collect.zero3 import partition_slices  # noqa: E402
from shardsave.ranks.identity import Ranks  # noqa: E402
from shardsave.ranks.rendezvous import Rendezvous, status_of  # noqa: E402
from shardsave.storage.streaming import TensorSpec  # noqa: E402

HERE = Path(__file__).resolve().parent
MIB = 2**20
ITEMSIZE = 2  # bf16
SIMULATED = (64, 128, 256, 512, 1024)
_BF16 = __import__("torch").bfloat16
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# -- the adapter and how each backend lays it out ------------------------------------------------------------


def linear_shapes(hidden: int = 4096, intermediate: int = 11008) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of a Llama decoder layer, in module order."""
    shapes = {p: (hidden, hidden) for p in PROJECTIONS[:4]}
    shapes.update(gate_proj=(intermediate, hidden), up_proj=(intermediate, hidden), down_proj=(hidden, intermediate))
    return shapes


def lora_shapes(layers: int = 32, r: int = 16, hidden: int = 4096, intermediate: int = 11008):
    """`name -> (rows, cols)` of every LoRA tensor, in state-dict order (lora_A is (r, in), lora_B (out, r))."""
    shapes = {}
    for i in range(layers):
        for proj, (out, inp) in linear_shapes(hidden, intermediate).items():
            prefix = f"layers.{i}.{proj}"
            shapes[f"{prefix}.lora_A"] = (r, inp)
            shapes[f"{prefix}.lora_B"] = (out, r)
    return shapes


def fsdp2_layout(shapes: Mapping[str, tuple[int, int]], n: int) -> dict[str, list[Slice]]:
    """`fully_shard`: dim-0 chunks (`torch.chunk`); lora_A's r rows sit on r ranks, the others hold none."""
    return {
        name: [Slice(k, a * cols, b * cols) for k, (a, b) in enumerate(chunk_ranges(rows, n))]
        for name, (rows, cols) in shapes.items()
    }


def flat_runs(units: Sequence[Sequence[tuple[str, int]]], n: int, align: int = 16 // ITEMSIZE) -> dict:
    """FSDP1: each unit's parameters `(name, numel)` are flattened in order, each start aligned to `align`
    elements (`use_orig_params=True`), the whole padded to a multiple of `n`; rank k holds `[k*S, (k+1)*S)`.
    Returns `name -> slices` of each parameter (as FSDP1Collector.slices computes them)."""
    out = {}
    for unit in units:
        offsets, total = {}, 0
        for name, numel in unit:
            total = -(-total // align) * align
            offsets[name] = (total, numel)
            total += numel
        shard = -(-total // n)
        for name, (offset, numel) in offsets.items():
            out[name] = [
                Slice(k, max(offset, k * shard) - offset, min(offset + numel, (k + 1) * shard) - offset)
                for k in range(n)
                if min(offset + numel, (k + 1) * shard) > max(offset, k * shard)
            ]
    return out


def fsdp1_peft_layout(shapes: Mapping[str, tuple[int, int]], n: int) -> dict[str, list[Slice]]:
    """FSDP1 with PEFT's `fsdp_auto_wrap_policy`: its lambda policy wraps every leaf module whose weight
    requires grad, so each `lora_A.default` and `lora_B.default` Linear is a unit of its own (one tensor per
    flat parameter, padded to a multiple of `n`)."""
    return flat_runs([[(name, rows * cols)] for name, (rows, cols) in shapes.items()], n)


def fsdp1_layer_layout(shapes: Mapping[str, tuple[int, int]], n: int, layers: int = 32) -> dict[str, list[Slice]]:
    """FSDP1 wrapping decoder layers only (a transformer policy without PEFT's): one flat parameter per layer
    holds the frozen base weights, the norms and the LoRA tensors in module order, so each LoRA tensor sits on
    one or two ranks."""
    hidden = shapes["layers.0.q_proj.lora_A"][1]
    intermediate = shapes["layers.0.gate_proj.lora_B"][0]
    units = []
    for i in range(layers):
        unit = []
        for proj, (out, inp) in linear_shapes(hidden, intermediate).items():
            prefix = f"layers.{i}.{proj}"
            unit += [(f"{prefix}.base", out * inp), (f"{prefix}.lora_A", math.prod(shapes[f"{prefix}.lora_A"]))]
            unit.append((f"{prefix}.lora_B", math.prod(shapes[f"{prefix}.lora_B"])))
        units.append(unit + [(f"layers.{i}.input_layernorm", hidden), (f"layers.{i}.post_attention_layernorm", hidden)])
    runs = flat_runs(units, n)
    return {name: runs[name] for name in shapes}


def zero3_layout(shapes: Mapping[str, tuple[int, int]], n: int) -> dict[str, list[Slice]]:
    """ZeRO-3 over the whole world: rank k holds `[k*P, (k+1)*P)`, `P = ceil(numel / n)`."""
    group = [tuple(range(n))]
    out = {}
    for name, (rows, cols) in shapes.items():
        numel = rows * cols
        out[name] = partition_slices(numel, -(-numel // n), group, zlib.crc32(name.encode()))
    return out


LAYOUTS: dict[str, Callable[[Mapping[str, tuple[int, int]], int], dict[str, list[Slice]]]] = {
    "FSDP2": fsdp2_layout,
    "FSDP1 (PEFT wrap)": fsdp1_peft_layout,
    "FSDP1 (layer units)": fsdp1_layer_layout,
    "ZeRO-3": zero3_layout,
}


# -- the gather: now, and as it was --------------------------------------------------------------------------


def plan_stats(layout: Mapping[str, list[Slice]], shapes: Mapping[str, tuple[int, int]], dst: int = 0) -> dict:
    """`TransferPlan.stats()` of the gather to `dst`, plus the adapter's bytes and the busiest sender's."""
    numels = {name: rows * cols for name, (rows, cols) in shapes.items()}
    plan = plan_transfer(layout, dict.fromkeys(layout, ITEMSIZE), numels, dst)
    sent = Counter()
    for r in plan.rounds:
        sent.update(r.sizes)
    return {
        **plan.stats(),
        "adapter_bytes": sum(numels.values()) * ITEMSIZE,
        "round_bytes": [r.nbytes for r in plan.rounds],
        "senders": len(sent),
    }


def old_gather_stats(layout: Mapping[str, list[Slice]], n: int, dst: int = 0, min_round: int = MIB) -> dict:
    """The gather before `shardsave.plan` (commit 7927b47), modelled: moves in layout order fill rounds; a round
    closes when one sender's packed bytes (16-byte aligned) would pass the per-rank budget, `max(min(max(moved
    / 2, n MiB), 256 MiB) / n, 1 MiB)`. Each round was one `dist.gather` of equal buffers of the widest
    sender's size: the writer received `n` of them (its own included), beside one send buffer of that size
    and the full output; one copy per slice."""

    def aligned(nbytes: int) -> int:
        return -(-nbytes // 16) * 16

    moves = [(s.rank, (s.stop - s.start) * ITEMSIZE) for slices in layout.values() for s in slices if s.stop > s.start]
    remote = [(rank, nbytes) for rank, nbytes in moves if rank != dst]
    moved = sum(nbytes for _, nbytes in remote)
    budget = max(min(max(moved // 2, n * min_round), 256 * MIB) // n, min_round)
    widths: list[int] = []
    used: Counter = Counter()
    for rank, nbytes in remote:
        if used[rank] and used[rank] + aligned(nbytes) > budget:
            widths.append(max(used.values()))
            used = Counter()
        used[rank] += aligned(nbytes)
    if used:
        widths.append(max(used.values()))
    adapter = sum(nbytes for _, nbytes in moves)
    return {
        "received_bytes": sum(n * w for w in widths),
        "largest_round_bytes": n * max(widths, default=0),
        "rounds": len(widths),
        "copy_ops": len(moves),
        "peak_extra_bytes": adapter + (n + 1) * max(widths, default=0),
    }


# -- the agreement ------------------------------------------------------------------------------------------

STORE_OPS = ("set", "get", "wait", "multi_get", "delete_key", "add", "check")


class CountingStore:
    """One rank's view of a shared store that counts every call it makes, per operation. No `clone`: the
    writer's heartbeat thread then uses this same view, so its calls count for the writer."""

    def __init__(self, store: dist.Store):
        self._store = store
        self.counts: Counter = Counter()

    def set(self, key, value):
        self.counts["set"] += 1
        return self._store.set(key, value)

    def get(self, key):
        self.counts["get"] += 1
        return self._store.get(key)

    def wait(self, keys, timeout: timedelta):
        self.counts["wait"] += 1
        return self._store.wait(keys, timeout)

    def multi_get(self, keys):
        self.counts["multi_get"] += 1
        return self._store.multi_get(keys)

    def delete_key(self, key):
        self.counts["delete_key"] += 1
        return self._store.delete_key(key)

    def add(self, key, amount):
        self.counts["add"] += 1
        return self._store.add(key, amount)

    def check(self, keys):
        self.counts["check"] += 1
        return self._store.check(keys)


_FORGET = threading.Lock()


def forget_previous(rdv: Rendezvous, previous: list[str]) -> list[str]:
    """`rdv.forget_previous()` for a rank that is a thread (shardsave keeps each rank's previous keys by rank,
    so threads as ranks need nothing special; the lock only keeps the counting simple)."""
    with _FORGET:
        rdv.forget_previous()
        return ranks_module._previous_keys.get(rdv.ranks.rank, [])


def decide_start(statuses: dict[int, dict]) -> dict:
    """What `save_pretrained`'s rank 0 decides: every rank planned the same save; exactly one writer."""
    if any(s["args"] != statuses[0]["args"] for s in statuses.values()):
        raise ValueError("ranks disagree on the save")
    writers = [rank for rank, s in sorted(statuses.items()) if s["main"]]
    if len(writers) != 1:
        raise ValueError(f"writers {writers}")
    return {"writer": writers[0], "decided": statuses[writers[0]]["decided"]}


def simulate_agreement(n: int, saves: int = 2, timeout: float = 60.0) -> dict:
    """`saves` saves' worth of store traffic at `n` ranks (threads): per save and rank, the count of each
    operation; the keys left in the store at the end; the wall time of each save."""
    store = dist.HashStore()
    views = [CountingStore(store) for _ in range(n)]
    counts = [[Counter() for _ in range(n)] for _ in range(saves)]
    errors: list[BaseException] = []
    starts = threading.Barrier(n)
    walls = [0.0] * saves
    payload = {
        "save_directory": "/checkpoints/step-1000",
        "safe_serialization": True,
        "selected_adapters": ["default"],
        "save_embedding_layers": "auto",
        "plan": "0123456789abcdef",
        "initial": None,
    }

    def rank_main(rank: int) -> None:
        previous: list[str] = []
        try:
            for g in range(saves):
                if starts.wait() == 0:
                    walls[g] = time.perf_counter()
                before = Counter(views[rank].counts)
                rdv = Rendezvous(Ranks(rank, n), op="bench", timeout=timeout, store=views[rank], generation=g)
                decided = {"destination": payload["save_directory"], "embeddings": {"default": False}}
                status = {"main": rank == 0, "args": payload, "decided": decided if rank == 0 else None}
                verdict = rdv.agree("start", status, decide=decide_start)
                previous = forget_previous(rdv, previous)
                if rank == verdict["writer"]:
                    with rdv.heartbeat():
                        pass  # the gather and the write
                    rdv.post("done", status_of(None))
                else:  # as save.py calls it: following the writer's heartbeat
                    rdv.wait_for("done", verdict["writer"], heartbeat=True)
                counts[g][rank] = views[rank].counts - before
                if starts.wait() == 0:
                    walls[g] = time.perf_counter() - walls[g]
        except BaseException as exc:  # reported after the join
            errors.append(exc)
            starts.abort()

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"simulated agreement at {n} ranks failed: {errors[0]!r}") from errors[0]
    return {"counts": counts, "keys_left": store.num_keys(), "seconds": walls}


def old_agreement_ops(n: int) -> int:
    """Store operations of one save under the previous agreement (before commit 7c5100b): every rank set its
    status, waited for all n keys and read each (n + 2); the writer set "done", every other rank waited for it
    and read it (2). Nothing was deleted."""
    return n * (n + 2) + 1 + 2 * (n - 1)


# -- load: files opened and bytes read -------------------------------------------------------------------

CONFIG_BYTES, CARD_BYTES = 900, 5000  # an adapter_config.json and a model card, as PEFT writes them (measured here)


def peft_key(name: str) -> str:
    return f"base_model.model.model.{name}.weight"


def shard_header_bytes(layout: Mapping[str, list[Slice]], n: int) -> list[int]:
    """Each shard file's header size (8 + JSON) as save_shards writes it: the tensors' entries, the metadata's
    `entries` list, and the `adapters` object (config and every key) and card that every shard repeats."""
    keys = json.dumps([peft_key(name) for name in layout])
    fixed = 8 + len(keys) + CONFIG_BYTES + CARD_BYTES + 200
    sizes = [fixed] * n
    for name, slices in layout.items():
        key = peft_key(name)
        for s in slices:
            if s.stop > s.start:
                tensor = f"default/{key}@{s.start}"
                entry = {"tensor": tensor, "adapter": "default", "key": key, "shape": [1, 1], "dtype": "BF16",
                         "start": s.start, "stop": s.stop}  # fmt: skip
                head = {tensor: {"dtype": "BF16", "shape": [s.stop - s.start], "data_offsets": [10**8, 10**8]}}
                sizes[s.rank] += len(json.dumps(entry)) + 2 + len(json.dumps(head))
    return sizes


def runs_met(starts: Sequence[int], start: int, stop: int) -> range:
    """Indices of the sorted runs (by start, tiling the tensor) that elements `[start, stop)` meet: what
    `shardsave.plan.ranges.read_items` returns, found by bisection."""
    if stop <= start:
        return range(0)
    return range(bisect_right(starts, start) - 1, bisect_left(starts, stop))


def load_counts(saved: Mapping[str, list[Slice]], wanted: Mapping[str, list[Slice]], n: int) -> dict:
    """Per rank, before and after: opens and bytes read of one load_pretrained from the shard set `saved` (file k
    holds rank k's runs) into ranks holding `wanted`; and from a save_pretrained folder (one file)."""
    headers = shard_header_bytes(saved, n)
    set_bytes = sum(headers) + sum((s.stop - s.start) * ITEMSIZE for sl in saved.values() for s in sl)
    items = [0] * n  # read items (an open each, before)
    files: list[set] = [set() for _ in range(n)]
    data = [0] * n
    for name, slices in saved.items():
        runs = sorted((s for s in slices if s.stop > s.start), key=lambda s: s.start)
        starts = [s.start for s in runs]
        for piece in wanted[name]:
            met = runs_met(starts, piece.start, piece.stop)
            items[piece.rank] += len(met)
            files[piece.rank].update(runs[i].rank for i in met)
            data[piece.rank] += (piece.stop - piece.start) * ITEMSIZE
    # before: every rank read the manifest twice, each shard's header twice (safe_open, then open) and hashed
    # it (3 opens), and opened the file again for every read item
    before = [2 + 3 * n + items[r] for r in range(n)]
    before_bytes = [set_bytes + sum(headers) + data[r] for r in range(n)]
    # after: rank 0 verifies as before (manifest 4 reads: its own, read_shard_set's two, the re-check) and keeps
    # one descriptor per file it reads; the others read the manifest once and open, once, the files holding
    # their ranges, reading each one's header once
    after = [1 + len(files[r]) for r in range(n)]
    after[0] = 4 + 3 * n + len(files[0])
    after_bytes = [sum(headers[f] for f in files[r]) + data[r] for r in range(n)]
    after_bytes[0] = set_bytes + sum(headers) + data[0]
    return {
        "set_bytes": set_bytes, "before": before, "before_bytes": before_bytes, "after": after,
        "after_bytes": after_bytes, "folder_before": [2 + items_folder for items_folder in _folder_items(wanted, n)],
        "folder_after": [3] * n, "data": data,
    }  # fmt: skip


def _folder_items(wanted: Mapping[str, list[Slice]], n: int) -> list[int]:
    """Read items from a folder's one safetensors file: one per tensor a rank holds a part of (one run each)."""
    count = [0] * n
    for slices in wanted.values():
        for piece in slices:
            if piece.stop > piece.start:
                count[piece.rank] += 1
    return count


def index_bytes(saved: Mapping[str, list[Slice]], n: int) -> int:
    """The JSON size of the real `shard_index` of the set: what rank 0 posts and every other rank gets."""
    from shardsave.formats.runs import AdapterFiles, ElementRun
    from shardsave.formats.shard_index import VerifiedShard, shard_index

    root = Path("/shards")
    paths = [root / f"shard-{k:05d}-of-{n:05d}.safetensors" for k in range(n)]
    specs = {peft_key(name): TensorSpec((max(s.stop for s in sl),), _BF16) for name, sl in saved.items()}
    runs = {peft_key(name): [ElementRun(s.start, s.stop, paths[s.rank], 0) for s in sl if s.stop > s.start]
            for name, sl in saved.items()}  # fmt: skip
    mtime = 1733300000 * 10**9
    verified = {p: VerifiedShard(k, 10**6, mtime + k, "0" * 64, "0" * 32, n, "default", frozenset())
                for k, p in enumerate(paths)}  # fmt: skip
    files = AdapterFiles(root, "shards", {"r": 16}, specs, runs, verified=verified, manifest_sha256="0" * 64)
    return len(json.dumps(shard_index(files)))


def load_table(ns: Sequence[int]) -> list[dict]:
    shapes = lora_shapes()
    rows = []
    print("\n## Load: files opened and bytes read per load_pretrained (Llama-7B LoRA r=16, bf16, 76 MiB)\n")
    print("Shard set saved by ZeRO-3 at N ranks; loaded at N ranks under ZeRO-3 (resume) or FSDP2 (resharded).\n")
    print("| load | N | before: opens per rank | before: opens in all | before: read in all / adapter | "
          "after: rank 0 opens | after: other ranks' opens (max) | after: opens in all | after: read in all / "
          "adapter | index from the store per rank | folder: opens in all, before -> after |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in ns:
        saved = zero3_layout(shapes, n)
        adapter = sum(r * c for r, c in shapes.values()) * ITEMSIZE
        index = index_bytes(saved, n)
        for load, wanted in (("ZeRO-3", saved), ("FSDP2", fsdp2_layout(shapes, n))):
            c = load_counts(saved, wanted, n)
            row = {"load": load, "n": n, "adapter_bytes": adapter, "index_bytes": index, **c}
            rows.append(row)
            print(f"| {load} | {n} | {max(c['before'])} | {sum(c['before'])} | "
                  f"{sum(c['before_bytes']) / adapter:.1f} | "
                  f"{c['after'][0]} | {max(c['after'][1:])} | {sum(c['after'])} | "
                  f"{sum(c['after_bytes']) / adapter:.2f} | {index / 1024:.1f} KiB | "
                  f"{sum(c['folder_before'])} -> {sum(c['folder_after'])} |")  # fmt: skip
    return rows


# -- real ranks ---------------------------------------------------------------------------------------------


def run_real(backend: str, nproc: int, model: dict, repeat: int) -> dict:
    """One torchrun of gathered_save.py (shardsave path only) at `nproc` gloo ranks; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(HERE / "gathered_save.py"), "--backend", backend, "--hidden", str(model["hidden"]),
            "--layers", str(model["layers"]), "--vocab", str(model["vocab"]), "--rank", str(model["rank"]),
            "--targets", model["targets"], "--repeat", str(repeat), "--paths", "shardsave", "--json", str(out),
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.exists():
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


# -- output -------------------------------------------------------------------------------------------------


def plan_table(ns: Sequence[int]) -> list[dict]:
    shapes = lora_shapes()
    rows = []
    for backend, make in LAYOUTS.items():
        for n in ns:
            layout = make(shapes, n)
            rows.append(
                {"backend": backend, "n": n, "new": plan_stats(layout, shapes), "old": old_gather_stats(layout, n)}
            )
    adapter = rows[0]["new"]["adapter_bytes"]
    print(f"\n## Gather plan: Llama-7B LoRA r=16 on all 7 projections, bf16, {adapter / MIB:.1f} MiB, writer rank 0\n")
    print("| backend | N | received / adapter | per round, MiB | senders | messages | copy ops | "
          "writer peak extra / adapter | old: received / adapter | old: rounds | old: copy ops | "
          "old: peak extra / adapter |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        new, old = row["new"], row["old"]
        per_round = " + ".join(f"{b / MIB:.1f}" for b in new["round_bytes"])
        print(f"| {row['backend']} | {row['n']} | {new['received_bytes'] / adapter:.3f} | {per_round} | "
              f"{new['senders']} | {new['messages']} | {new['copy_ops']} | "
              f"{new['peak_extra_bytes'] / adapter:.3f} | {old['received_bytes'] / adapter:.1f} | {old['rounds']} | "
              f"{old['copy_ops']} | {old['peak_extra_bytes'] / adapter:.1f} |")  # fmt: skip
    return rows


def agreement_table(ns: Sequence[int]) -> list[dict]:
    rows = []
    print("\n## Agreement: store operations per save (threads on one HashStore; the second of two saves)\n")
    print("| N | in all | / N | rank 0 (writer) | other ranks (max) | old: in all | old / new | "
          "keys left after 2 saves | wall time of the save (threads) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for n in ns:
        result = simulate_agreement(n)
        last = result["counts"][-1]
        total = sum(sum(c.values()) for c in last)
        writer = sum(last[0].values())
        others = max(sum(c.values()) for c in last[1:])
        old = old_agreement_ops(n)
        rows.append({"n": n, "total": total, "writer": writer, "others": others, "old": old, **result})
        print(f"| {n} | {total} | {total / n:.2f} | {writer} ({dict(last[0])}) | {others} ({dict(last[1])}) | {old} | "
              f"{old / total:.0f}x | {result['keys_left']} | {result['seconds'][-1] * 1e3:.0f} ms |")  # fmt: skip
    return rows


REAL_MODELS = {
    "quick": dict(hidden=256, layers=4, vocab=4000, rank=16, targets=",".join(PROJECTIONS)),
    "full": dict(hidden=512, layers=8, vocab=8000, rank=64, targets=",".join(PROJECTIONS)),
}


def real_table(backends: Sequence[str], ns: Sequence[int], model: dict, repeat: int) -> list[dict]:
    rows = []
    for backend in backends:
        for n in ns:
            started = time.perf_counter()
            result = run_real(backend, n, model, repeat)
            rows.append({"backend": backend, "n": n, **result})
            print(f"{backend} {n} ranks: {result['results']['shardsave']['seconds'] * 1e3:.1f} ms "
                  f"(run {time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    print(f"\n## Real ranks: gloo on this machine ({os.cpu_count()} CPUs), median of {repeat} after a warm-up\n")
    print("| backend | model | adapter | N | save | vs 2 ranks | writer peak extra | extra / adapter |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        t = row["results"]["shardsave"]["seconds"]
        base = next(r for r in rows if r["backend"] == row["backend"])["results"]["shardsave"]["seconds"]
        extra = row["results"]["shardsave"]["extra_bytes"]
        adapter = row["adapter_bytes"]
        print(f"| {row['backend']} | {row['params'] / 1e6:.0f}M | {adapter / MIB:.2f} MiB | {row['n']} | "
              f"{t * 1e3:.1f} ms | {t / base:.2f}x | {extra / MIB:.1f} MiB | {extra / adapter:.2f}x |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="plan,agree,real", help="subset of plan,agree,real,load")
    parser.add_argument("--quick", action="store_true", help="smaller real model, fewer repeats and world sizes")
    parser.add_argument("--ranks", default=",".join(map(str, SIMULATED)), help="simulated world sizes")
    parser.add_argument("--real-ranks", help="real world sizes (2,4,8; --quick 2,8)")
    parser.add_argument("--backends", default="fsdp2,zero3", help="real runs: fsdp2,fsdp1,zero3")
    parser.add_argument("--repeat", type=int, help="real runs: timed saves after the warm-up (5; --quick 3)")
    parser.add_argument("--json", type=Path, help="write every result here")
    args = parser.parse_args()
    parts = args.parts.split(",")
    ns = [int(n) for n in args.ranks.split(",")]
    results = {}
    if "plan" in parts:
        started = time.perf_counter()
        results["plan"] = plan_table(ns)
        print(f"\n(planned in {time.perf_counter() - started:.1f} s)")
    if "agree" in parts:
        results["agree"] = agreement_table(ns)
    if "load" in parts:
        results["load"] = load_table([n for n in ns if n != 128])
    if "real" in parts:
        model = REAL_MODELS["quick" if args.quick else "full"]
        repeat = args.repeat or (3 if args.quick else 5)
        real_ns = [int(n) for n in (args.real_ranks or ("2,8" if args.quick else "2,4,8")).split(",")]
        results["real"] = real_table(args.backends.split(","), real_ns, model, repeat)
        by_backend = {}
        for row in results["real"]:
            by_backend.setdefault(row["backend"], []).append(row["results"]["shardsave"]["seconds"])
        for backend, times in by_backend.items():
            print(f"{backend}: {max(real_ns)} vs {min(real_ns)} ranks {times[-1] / times[0]:.2f}x "
                  f"(median over N {statistics.median(times) * 1e3:.1f} ms)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
