"""The handshake every shardsave call runs: plan on every rank, agree, (restage), move, and the writer's end.

1. `agree_on_plan`: every rank plans from metadata alone (`prepare`), whatever fails is caught, and all ranks agree
   on the outcome in one store agreement: a plan that failed on one rank raises on every rank before anything moves.
   `load_pretrained` runs this step alone (its phase `load`): each rank writes its own part, so there is no writer,
   no replica to compare and no stage to put together.
2. `start`, for the calls with one writer (`save_pretrained`, `gather_state_dict`, `save_shards`, `save_merged`):
   the same arguments on every rank, exactly one writer, whose decisions everyone follows (`WriterRequest.decided`);
   replicated runs compared (`replicas_to_check`, `compare_replicas`); and, where the ranks hold different parts of
   the model (pipeline stages), their union put together and followed (`WriterRequest.view` / `restage`).
3. `run_gather`: a prepared gather, bounded by the call's timeout, its failure worded for the user.
4. `writer_done` on the writer, `await_writer` on the others: the writer's outcome reaches every rank, which waits
   for it as long as the writer's heartbeat goes on.

The requests declare what the handshake reads of them (`Request`, `WriterRequest`): nothing is looked up by name.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TypeVar

from shardsave.errors import MissingRanksError, SaveError, TransferError
from shardsave.log import logger
from shardsave.plan.stages import pack_union, union_views, unpack_union
from shardsave.ranks.identity import Ranks
from shardsave.ranks.rendezvous import Rendezvous, check_same_args, raise_on_failure, status_of
from shardsave.ranks.replicas import digests, members, refuse_drift, to_ask

__all__ = [
    "Request",
    "WriterRequest",
    "agree_on_plan",
    "start",
    "replicas_to_check",
    "compare_replicas",
    "run_gather",
    "writer_done",
    "await_writer",
]


class Request(ABC):
    """One rank's plan of a call, made from metadata before anything moves: what the first agreement posts of it."""

    __slots__ = ()
    args: dict  # the call's arguments and plan digest: the same on every rank, or the call is refused

    @abstractmethod
    def status(self) -> dict:
        """What this rank posts in the first agreement (JSON-able): `args` and what rank 0 decides from."""

    def abandon(self) -> None:  # noqa: B027 (optional: most requests start nothing in the background)
        """Undo what planning started in the background, for a call that will not go on (default: nothing)."""


class WriterRequest(Request):
    """A plan whose tensors go to one writer, or whose files one rank vouches for (`save_shards`)."""

    __slots__ = ()
    decided: dict | None  # the writer's decisions (destination, ...): set on the writer, on every rank by `start`
    replicas: dict[str, dict[str, str]]  # this rank's fingerprints of runs other ranks hold copies of, by group

    def status(self) -> dict:
        return {"args": self.args, "decided": self.decided, "replicas": digests(self.replicas)}

    @abstractmethod
    def view(self) -> dict:
        """This rank's part, for a model whose ranks hold different parts (`shardsave.plan.stages`)."""

    @abstractmethod
    def restage(self, union: dict, writer: int, ranks: Ranks) -> None:
        """Follow the plan all ranks' parts make up (`union`, from `shardsave.plan.stages.union_views`)."""


R = TypeVar("R", bound=Request)
W = TypeVar("W", bound=WriterRequest)
_NO_PLAN = {"args": {}, "decided": None, "replicas": {}}  # what a writer request's rank posts when planning failed


def agree_on_plan(
    rdv: Rendezvous,
    prepare: Callable[[], R],
    *,
    phase: str,
    failed: dict,
    decide: Callable[[dict[int, dict]], object] | None,
    head: dict | None = None,
    then: Callable[[R, object], None] | None = None,
) -> tuple[R, object]:
    """Run `prepare()` on every rank and agree on the outcome at `phase`: each posts `head` and its request's
    `status()` (`failed` where planning raised), rank 0 runs `decide`; `then(request, verdict)` runs next, still
    abandoning the request if it raises. Returns (this rank's request, the verdict); raises on every rank."""
    request, error = None, None
    try:
        request = prepare()
    except Exception as exc:  # shared with the other ranks below, then re-raised
        error = exc
    payload = {**(head or {}), **(failed if request is None else request.status())}
    try:
        verdict = rdv.agree(phase, payload, own=error, decide=decide)
        if then is not None:
            then(request, verdict)
    except BaseException:
        if request is not None:
            request.abandon()
        raise
    return request, verdict


def start(rdv: Rendezvous, prepare: Callable[[bool], W], main: bool | None) -> tuple[W, int]:
    """The start of a call with one writer: `prepare(is_main)` on every rank, agreed (arguments, writer, replicas),
    restaged where the ranks hold different parts. Returns this rank's request, with the writer's decisions in
    `decided`, and the writer rank (-1: a single process that is not the main process)."""
    ranks = rdv.ranks
    is_main = (ranks.rank == 0) if main is None else bool(main)
    request, verdict = agree_on_plan(
        rdv,
        lambda: prepare(is_main),
        phase="start",
        failed=_NO_PLAN,
        decide=_decide_start if ranks.distributed else None,
        head={"main": is_main},
        then=(lambda request, verdict: _recheck(rdv, request, verdict)) if ranks.distributed else None,
    )
    if not ranks.distributed:
        return request, (ranks.rank if is_main else -1)
    if verdict.get("staged"):
        _restage(rdv, request, verdict["writer"])
    rdv.forget_previous()
    if request.decided is None:
        request.decided = verdict["decided"]
    return request, verdict["writer"]


def _decide_start(statuses: dict[int, dict]) -> dict:
    """Rank 0's verdict on the plans of all ranks: the same arguments, exactly one writer, whose decisions
    everyone follows; the same layout, or else parts of one model (pipeline stages), put together next."""
    args = {rank: {"args": {k: v for k, v in s["args"].items() if k != "plan"}} for rank, s in statuses.items()}
    check_same_args(args, op="save", plan_means="model or adapter layout")
    staged = len({status["args"].get("plan") for status in statuses.values()}) > 1
    recheck = None if staged else replicas_to_check(statuses)
    writer = _pick_writer(statuses)
    return {"writer": writer, "decided": statuses[writer].get("decided"), "staged": staged, "recheck": recheck}


def _pick_writer(statuses: dict[int, dict]) -> int:
    writers = [rank for rank, status in sorted(statuses.items()) if status["main"]]
    if len(writers) != 1:
        raise ValueError(
            f"Exactly one rank must write, but is_main_process is true on rank(s) {writers}. Pass "
            f"is_main_process=(rank == 0) (or accelerator.is_main_process), or leave it None for rank 0."
        )
    return writers[0]


def replicas_to_check(statuses: dict[int, dict]) -> dict | None:
    """Rank 0's comparison of every rank's digest per replica group (`status["replicas"]`); where a group's digests
    differ, which ranks to ask for their fingerprints (one per distinct digest) and the group's members."""
    by_rank = {rank: status.get("replicas") or {} for rank, status in statuses.items()}
    ask = to_ask(by_rank)
    if not ask:
        return None
    groups = sorted({g for wanted in ask.values() for g in wanted})
    return {"ask": {str(rank): wanted for rank, wanted in ask.items()}, "members": members(by_rank, groups)}


def compare_replicas(
    rdv: Rendezvous, prints: dict[str, dict[str, str]], recheck: dict, *, written: bool = False
) -> None:
    """The replica check's second round, only when some group's digests differ (`replicas_to_check`): the ranks
    asked post their fingerprints of those groups (`prints`: this rank's, by group), and rank 0 names the run that
    differs (`shardsave.ranks.replicas.refuse_drift`; `written`: compared after the files were written). Raises on
    every rank."""
    wanted = recheck["ask"].get(str(rdv.ranks.rank), [])
    mine = {group: prints[group] for group in wanted}

    def refuse(statuses: dict[int, dict]) -> None:
        refuse_drift({rank: s["prints"] for rank, s in statuses.items()}, recheck["members"], written=written)

    rdv.agree("replicas", {"prints": mine}, decide=refuse)


def _recheck(rdv: Rendezvous, request: WriterRequest, verdict: dict) -> None:
    """The second round of `start`'s replica check, where rank 0 found a group's digests differ."""
    if verdict.get("recheck"):
        compare_replicas(rdv, request.replicas, verdict["recheck"])


def _view_digest(view: dict | None) -> str | None:
    return None if view is None else hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:32]


def _pick_views(statuses: dict[int, dict], seen: dict) -> dict:
    """Rank 0, first round: one rank per distinct view digest is asked for its view (data-parallel replicas of a
    stage hold the same view); `seen` keeps every rank's digest for the second round, on rank 0 only."""
    seen.update({rank: status["view"] for rank, status in statuses.items()})
    first: dict[str, int] = {}
    for rank, digest in sorted(seen.items()):
        first.setdefault(digest, rank)
    return {"ask": sorted(first.values())}


def _union(statuses: dict[int, dict], seen: dict[int, str]) -> dict:
    """Rank 0, second round: the union of every rank's view, each rank's being that of the rank asked for its
    digest (`shardsave.plan.stages.union_views`, which refuses parts that do not add up)."""
    posted = {seen[rank]: status["view"] for rank, status in statuses.items() if "view" in status}
    return pack_union(union_views({rank: posted[digest] for rank, digest in seen.items()}))


def _restage(rdv: Rendezvous, request: WriterRequest, writer: int) -> None:
    """The ranks hold different parts of the model (pipeline stages): each reports its part, rank 0 puts them
    together (`shardsave.plan.stages.union_views`, which refuses parts that do not add up), every rank follows that
    plan. Each rank first posts a digest of its part and only one rank per distinct digest the part itself; the
    union, read by every rank, is deleted once all have read it. Following the plan can fail on one rank alone (the
    writer's gather buffers, its initial adapter), so its outcome is agreed too before any tensor moves: else the
    others would send into a gather nobody receives. Costs three more agreements, only for such models."""
    view, error = None, None
    try:
        view = request.view()
    except Exception as exc:
        error = exc
    seen: dict[int, str] = {}  # rank 0: each rank's digest
    try:
        digest = _view_digest(view)
        asked = rdv.agree("stages", {"view": digest}, own=error, decide=lambda s: _pick_views(s, seen))
        mine = {"view": view} if rdv.ranks.rank in asked["ask"] else {}
        union = unpack_union(rdv.agree("views", mine, decide=lambda statuses: _union(statuses, seen)))
        rdv.release("views")
        try:
            request.restage(union, writer, rdv.ranks)
        except Exception as exc:
            error = exc
        rdv.agree("restaged", {}, own=error)
    except BaseException:
        request.abandon()
        raise
    logger.info("the ranks hold different parts of the model (pipeline stages): saving their union of %d tensors",
                len(union["tensors"]))  # fmt: skip


def run_gather(transfer, writer: int, rdv: Rendezvous) -> tuple[dict, SaveError | None]:
    """Run a prepared gather, bounded by the call's timeout. A failed or timed-out exchange becomes a
    `SaveError` saying that a peer probably died or hangs; any other error is this rank's own and is
    reported as such."""
    started = time.perf_counter()
    try:
        return transfer.run(rdv.timeout), None
    except TransferError as exc:
        error = SaveError(
            f"shardsave.{rdv.op}: moving the adapter's tensors to rank {writer} failed on rank {rdv.ranks.rank} "
            f"after {time.perf_counter() - started:.1f} s (timeout={rdv.timeout:g} s): {exc}. Another rank has "
            f"probably died or stopped responding; nothing was written. Check the other ranks' logs."
        )
        cause = exc
    except Exception as exc:
        error = SaveError(
            f"shardsave.{rdv.op}: rank {rdv.ranks.rank} failed while moving the adapter's tensors to rank {writer}: "
            f"{type(exc).__name__}: {exc}. Nothing was written."
        )
        cause = exc
    error.__cause__ = cause
    return {}, error


def writer_done(rdv: Rendezvous, error: BaseException | None, *, then: Iterable[Callable[[], None]] = ()) -> None:
    """The writer's end: post its outcome for `await_writer` on the others, run `then` (work that may wait until
    they are released: removing the previous adapter), raise its error."""
    if rdv.ranks.distributed:
        rdv.post("done", status_of(error))
    for task in then:
        task()
    if error is not None:
        raise error


def await_writer(rdv: Rendezvous, writer: int, *, on_missing: Callable[[], None] | None = None) -> None:
    """The others' end: wait for the writer's outcome as long as its heartbeat goes on (a slow filesystem), and
    raise its error as a `RemoteError`. `on_missing`: what to do first when the writer provably died."""
    try:
        outcome = rdv.wait_for("done", writer, heartbeat=True)
    except MissingRanksError:
        if on_missing is not None:
            on_missing()
        raise
    raise_on_failure({writer: outcome}, own=None, ranks=rdv.ranks, op=rdv.op)
