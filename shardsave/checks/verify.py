"""Check a saved PEFT adapter for the silent failures of distributed saves, before it is shipped or merged.

The library behind `python -m shardsave.verify` (its command line is `shardsave.cli.verify`'s), which save,
rescue and merge call on what they wrote.

A save under ZeRO-3 or FSDP that went wrong rarely raises: it writes a 40-byte file of `(0,)`-shaped tensors,
an adapter whose `lora_B` are all zero (merged == base), or one where only one rank's slice of every `lora_B`
survived. This reads any adapter folder (PEFT's, Trainer's, shardsave's; non-default adapters in their
subfolders) one tensor at a time and names each problem with its key. Without `--base` the shapes are checked
against the config's `r` / `rank_pattern`; with it, against what PEFT builds on the base model's structure,
made on the meta device (no weights are loaded, nothing is downloaded).
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from shardsave.errors import VerifyError
from shardsave.formats.adapter import (
    adapters_in,
    iter_tensors,
    read_config,
    safetensors_names,
    tensor_shapes,
    weights_file,
)
from shardsave.formats.shard_set import MANIFEST_NAME
from shardsave.log import logger
from shardsave.plan.merge_steps import pattern_key
from shardsave.plan.names import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME

__all__ = [
    "VerifyError",
    "Finding",
    "AdapterSummary",
    "Report",
    "KINDS",
    "check_tensors",
    "warn_findings",
    "verify_adapter",
    "callback_adapter",
]

PREFIX = "base_model.model."
#: Adapter types whose keys carry no model prefix (prompt learning saves bare `prompt_embeddings`).
_UNPREFIXED_TYPES = frozenset({"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"})
_LORA_PART = re.compile(
    r"^(?P<module>.*)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<leaf>weight|bias))?$"
)
_MAX_SLICES = 1024
_MAX_WARNED = 20  # findings listed in one warning

#: Every `Finding.kind`, and what it means (the names are stable: `--json` consumers match on them).
KINDS = {
    "no_tensors": "the weights file holds no tensor",
    "empty": "a tensor with no element (what a ZeRO-3 / FSDP save that did not gather writes)",
    "non_finite": "NaN or Inf values",
    "shape": "a shape that disagrees with the config (r, rank_pattern) or with the base model",
    "incomplete": "a LoRA module with only some of its tensors (lora_A without lora_B, DoRA without magnitude)",
    "no_prefix": f"a key without the {PREFIX!r} prefix: PEFT does not load it, silently",
    "no_effect": "every lora_B is zero: the LoRA update is zero and merging it gives the base model",
    "zero_lora_b": "this lora_B is zero while others are not: its module's update was lost (or never trained)",
    "sliced": "only one contiguous 1/N block of every lora_B is non-zero: one rank's slice was saved",
    "missing": "a tensor PEFT expects for this config on the base model is not in the file",
    "unexpected": "a tensor that PEFT would not load for this config on the base model",
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: in which adapter, which tensor (None for the adapter as a whole), what kind, and why."""

    adapter: str
    kind: str
    key: str | None
    message: str


@dataclass(frozen=True, slots=True)
class AdapterSummary:
    """What was read: the adapter's name, its folder, weights file and tensor count."""

    name: str
    directory: str
    file: str
    peft_type: str | None
    tensors: int


@dataclass(slots=True)
class Report:
    """The findings for every adapter under `path`; `sound` when there are none."""

    path: str
    base: str | None = None
    adapters: list[AdapterSummary] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    #: What the framework checkpoint beside the adapter (Trainer's checkpoint-N/) lacks; not the adapter's problem
    notes: list[str] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.findings

    def to_json(self) -> dict:
        out = {
            "path": self.path,
            "base": self.base,
            "sound": self.sound,
            "adapters": [asdict(a) for a in self.adapters],
            "findings": [asdict(f) for f in self.findings],
        }
        return out | ({"notes": self.notes} if self.notes else {})


# --- reading -------------------------------------------------------------------------------------------


_PICKLE_FIX = "Pass --allow-pickle (allow_pickle=True) to read it with torch.load(weights_only=True)."


def _adapter_dirs(root: Path) -> list[tuple[str, Path]]:
    """`(name, folder)` of every adapter PEFT would load from `root`: `default` at the root, others below."""
    if not root.is_dir():
        raise VerifyError(f"{root}: not a directory. Pass the folder that holds {CONFIG_NAME}.")
    found = adapters_in(root)
    if not found:
        weights = [n for n in (SAFETENSORS_NAME, BIN_NAME) if (root / n).exists()]
        raise VerifyError(
            f"{root}: no {CONFIG_NAME} here or in a subfolder"
            + (f" (but {weights[0]} is here)" if weights else "")
            + ". PEFT cannot load an adapter without its config: copy the training run's adapter_config.json "
            "next to the weights."
        )
    return found


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    config = read_config(path, error=VerifyError, fix="; restore the adapter_config.json the training wrote")
    if config.get("peft_type") == "LORA" and not (isinstance(config.get("r"), int) and config["r"] > 0):
        raise VerifyError(f"{path}: a LoRA config without a positive integer 'r' ({config.get('r')!r}).")
    return config


def _tensors(path: Path, allow_pickle: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """`(key, tensor)` one at a time, memory-mapped: only the tensor being checked is in memory."""
    return iter_tensors(path, allow_pickle=allow_pickle, fix=_PICKLE_FIX, error=VerifyError)


# --- checks ---------------------------------------------------------------------------------------------


def _expected_rank(module: str, config: Mapping) -> int:
    pattern = config.get("rank_pattern") or {}
    if pattern:  # PEFT's rule (`get_pattern_key`), shardsave's copy: verify without --base imports no peft
        hit = pattern_key(pattern, module)
        if hit is not None:
            return int(pattern[hit])
    return int(config["r"])


def _lora_shape_problem(part: str, shape: tuple[int, ...], r: int, multiple: bool) -> str | None:
    """Why `shape` cannot be this LoRA tensor's at rank `r` (None when it can). `multiple`: a rank dimension that
    is a multiple of r is right (LoRA on parameters stacks one rank block per expert)."""
    if part in ("lora_magnitude_vector", "bias"):
        return None  # their size is the module's output size, checked against lora_B
    axis = 0 if part in ("lora_A", "lora_embedding_A") else 1
    if len(shape) < 2:
        return f"is {list(shape)}, but {part} has at least 2 dimensions"
    have = shape[axis]
    if have == r or (multiple and have % r == 0):
        return None
    where = "first" if axis == 0 else "second"
    return f"is {list(shape)}: its {where} dimension should be the rank r={r} of the config"


def _block(mask: torch.Tensor) -> tuple[int, int] | None:
    """`(lo, hi)` when the True entries of a 1-D mask are exactly `lo:hi`, else None (none, or not contiguous)."""
    index = mask.nonzero().flatten()
    if index.numel() == 0:
        return None
    lo, hi = int(index[0]), int(index[-1]) + 1
    return (lo, hi) if hi - lo == index.numel() else None


def _slicings(block: tuple[int, int] | None, size: int) -> set[tuple[int, int]] | None:
    """Every `(N, k)` such that `block` is exactly rank k's part of `size` split in N (ceil-sized chunks, as
    FSDP2 and torch.chunk split); None when the block is not one (no block, or the whole size)."""
    if block is None or block == (0, size):
        return None
    lo, hi = block
    out = set()
    for n in range(2, _MAX_SLICES + 1):
        chunk = math.ceil(size / n)
        if lo % chunk == 0 and hi == min(lo + chunk, size):
            out.add((n, lo // chunk))
    return out


@dataclass(slots=True)
class _BState:
    """What the adapter-wide lora_B checks need of each lora_B: sizes and non-zero blocks, not the values."""

    rows: int
    cols: int
    zero: bool
    row_block: tuple[int, int] | None
    col_block: tuple[int, int] | None


def _b_state(matrix: torch.Tensor) -> _BState:
    """A lora_B (as rows x columns) summed up. A trained lora_B is non-zero everywhere and an untrained one is
    zero everywhere: two cheap reductions settle those; only a partly zero one needs its rows and columns."""
    rows, cols = matrix.shape
    nonzero = matrix.bool()  # as `!= 0`: -0.0 is zero, NaN is not
    if bool(nonzero.all()):
        return _BState(rows, cols, False, (0, rows) if rows else None, (0, cols) if cols else None)
    if not bool(nonzero.any()):
        return _BState(rows, cols, True, None, None)
    return _BState(rows, cols, False, _block(nonzero.any(dim=1)), _block(nonzero.any(dim=0)))


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in `tensor`. A finite sum (in float32 or wider) proves it in one cheap pass; only a sum that
    overflows or is NaN needs the exact check, several times slower."""
    if tensor.element_size() >= 2:
        wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        if bool(torch.isfinite(tensor.sum(dtype=wide))):
            return True
    return bool(torch.isfinite(tensor).all())


def _slice_finding(name: str, bs: dict[str, _BState]) -> Finding | None:
    live = {k: b for k, b in bs.items() if not b.zero}
    for axis, what in ((0, "rows"), (1, "columns")):
        common: set[tuple[int, int]] | None = None
        for b in live.values():
            found = _slicings(b.row_block if axis == 0 else b.col_block, b.rows if axis == 0 else b.cols)
            common = found if common is None else (common & found if found is not None else set())
            if not common:
                break
        if not common:
            continue
        # a lora_B that is all zero fits when rank k's chunk of it is empty
        common = {
            (n, k)
            for n, k in common
            if all(k * math.ceil((b.rows if axis == 0 else b.cols) / n) >= (b.rows if axis == 0 else b.cols)
                   for b in bs.values() if b.zero)
        }  # fmt: skip
        if not common:
            continue
        n, k = min(common)
        others = sorted({m for m, _ in common} - {n})
        return Finding(
            name,
            "sliced",
            None,
            f"in all {len(live)} non-zero lora_B, only {what} of part {k} of {n} are non-zero"
            + (f" (or of {others})" if others else "")
            + f": only one rank's 1/{n} slice was saved (likely {n} ranks), the rest is zero. Re-save the "
            f"adapter with shardsave.save_pretrained on every rank, or rebuild it from the framework checkpoint.",
        )
    return None


def _lora_b_findings(name: str, bs: dict[str, _BState], others: list[str]) -> list[Finding]:
    if not bs:
        return []
    zero = sorted(k for k, b in bs.items() if b.zero)
    if len(zero) == len(bs):
        also = f" (only {', '.join(others)} can still change the model)" if others else ""
        return [
            Finding(
                name,
                "no_effect",
                None,
                f"all {len(bs)} lora_B tensors are zero, so the adapter's LoRA update is zero and merging it gives "
                f"the base model{also}: untrained (B starts at zero) or its weights were lost in the save.",
            )
        ]
    sliced = _slice_finding(name, bs)
    if sliced is not None:
        return [sliced]
    return [
        Finding(name, "zero_lora_b", k, "all zero while other lora_B are not: this module's update was lost or never "
                "trained.")
        for k in zero
    ]  # fmt: skip


def _peft_type(config: Mapping) -> str | None:
    """The config's `peft_type` as the string adapter_config.json holds: `PeftConfig.to_dict()` gives the
    `PeftType` enum, whose `str()` is "PeftType.LORA", not "LORA"."""
    value = config.get("peft_type")
    return None if value is None else str(getattr(value, "value", value))


def check_tensors(
    adapter_name: str,
    config: Mapping,
    tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
) -> list[Finding]:
    """The findings for one adapter's tensors, as written: empty, non-finite, unprefixed or misshapen tensors
    (against `r` / `rank_pattern`), incomplete LoRA modules, and all-zero or one-rank-sliced `lora_B`.

    `config` is the adapter's config as adapter_config.json holds it (or `PeftConfig.to_dict()`); `tensors` is
    a mapping or `(key, tensor)` pairs, consumed one at a time, so that a file can be checked without holding
    it in memory. Each tensor is read once; nothing is kept of it but its shape and where lora_B is non-zero.
    """
    with _one_thread():
        return _check(adapter_name, config, tensors.items() if isinstance(tensors, Mapping) else tensors)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Intra-op parallelism off while checking (process-wide, for those milliseconds; restored after). Each check
    is a small reduction, which more threads do not speed up; and where training keeps the cores busy, each
    parallel reduction waits milliseconds for its threads (a 17 MB adapter: 200 ms instead of 3 ms on 2 busy
    cores)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check(name: str, config: Mapping, pairs: Iterable[tuple[str, torch.Tensor]]) -> list[Finding]:
    peft_type = _peft_type(config)
    lora = peft_type == "LORA"
    multiple = bool(config.get("target_parameters"))
    findings: list[Finding] = []
    bs: dict[str, _BState] = {}
    parts: dict[str, dict[str, tuple[int, ...]]] = {}  # module -> part -> shape
    extras = 0  # tensors other than LoRA's (modules_to_save copies, trainable tokens, saved layers)
    count = 0
    for key, tensor in pairs:
        count += 1
        shape = tuple(tensor.shape)
        match = _LORA_PART.match(key) if lora else None
        module = match["module"].removeprefix(PREFIX) if match else ""
        part = ("bias" if match["leaf"] == "bias" else match["part"]) if match else ""
        if match:
            parts.setdefault(module, {})[part] = shape
        if tensor.numel() == 0:
            findings.append(Finding(name, "empty", key, f"has shape {list(shape)}: no element was saved."))
            continue
        if tensor.is_floating_point() and not _all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            findings.append(Finding(name, "non_finite", key, f"{bad} of {tensor.numel()} values are NaN or Inf."))
        if peft_type not in _UNPREFIXED_TYPES and not key.startswith(PREFIX):
            findings.append(
                Finding(name, "no_prefix", key, f"does not start with {PREFIX!r}, so PEFT silently skips it when "
                        f"loading; save with PeftModel.save_pretrained or shardsave.save_pretrained.")
            )  # fmt: skip
        if match is None:
            extras += 1
            continue
        problem = _lora_shape_problem(part, shape, _expected_rank(module, config), multiple)
        if problem is not None:
            findings.append(Finding(name, "shape", key, problem + "."))
        if part in ("lora_B", "lora_embedding_B") and len(shape) >= 2:
            bs[key] = _b_state(tensor.reshape(shape[0], -1))
    if count == 0:
        findings.append(Finding(name, "no_tensors", None, "no tensor was saved: the weights file is empty."))
    for module, have in sorted(parts.items()):
        findings += _pair_findings(name, module, have, bool(config.get("use_dora")))
    others = ["the DoRA magnitudes"] if any("lora_magnitude_vector" in p for p in parts.values()) else []
    others += [f"{extras} other saved tensors"] if extras else []
    findings += _lora_b_findings(name, bs, others)
    return findings


def _check_adapter(name: str, directory: Path, config: dict, allow_pickle: bool) -> tuple[AdapterSummary, list]:
    path = weights_file(directory, error=VerifyError)
    if path.suffix == ".safetensors":
        safetensors_names(path, error=VerifyError)  # unreadable: fail before any finding
    count = 0

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal count
        for pair in _tensors(path, allow_pickle):
            count += 1
            yield pair

    findings = check_tensors(name, config, counted())
    return AdapterSummary(name, str(directory), path.name, _peft_type(config), count), findings


def _pair_findings(name: str, module: str, have: dict[str, tuple[int, ...]], dora: bool) -> list[Finding]:
    embedding = "lora_embedding_A" in have or "lora_embedding_B" in have
    a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    key = f"{PREFIX}{module}"
    out = []
    for part in (a, b):
        if part not in have:
            leaf = ".weight" if part in ("lora_A", "lora_B") else ""
            out.append(Finding(name, "incomplete", f"{key}.{part}{leaf}", f"missing while {key} has {sorted(have)}."))
    if dora and "lora_magnitude_vector" not in have:
        out.append(Finding(name, "incomplete", f"{key}.lora_magnitude_vector", "missing: the config uses DoRA."))
    if b in have and len(have[b]) >= 2:
        size = have[b][0]
        for part in ("lora_magnitude_vector", "bias"):
            if part in have and math.prod(have[part]) != size:
                out.append(
                    Finding(name, "shape", f"{key}.{part}", f"is {list(have[part])}, but {b} has {size} outputs.")
                )
    return out


# --- against the base model -------------------------------------------------------------------------------


def _base_config(base: str):
    from shardsave.plan.skeleton import SkeletonError, base_config

    try:
        return base_config(base)
    except SkeletonError as exc:
        raise VerifyError(str(exc)) from None


def _expected_state(base_config, directory: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """What PEFT itself saves for this config on the base's structure: key -> shape, and every key of the model
    (a saved frozen layer, such as a resized embedding, is one of those)."""
    from peft import PeftConfig, get_peft_model_state_dict

    from shardsave.plan.skeleton import SkeletonError, peft_skeleton

    try:
        config = PeftConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise VerifyError(f"{directory / CONFIG_NAME}: PEFT cannot read it ({exc}).") from None
    try:
        peft_model = peft_skeleton(base_config, {"default": config}, where=str(directory / CONFIG_NAME))
        expected = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    except SkeletonError as exc:
        raise VerifyError(str(exc)) from None
    return {k: tuple(v.shape) for k, v in expected.items()}, set(peft_model.state_dict())


def _base_findings(name: str, path: Path, expected: dict, known: set[str], allow_pickle: bool) -> list[Finding]:
    saved = tensor_shapes(path, allow_pickle=allow_pickle, fix=_PICKLE_FIX, error=VerifyError)  # readable: checked
    out = []
    for key, shape in sorted(expected.items()):
        if key not in saved:
            out.append(Finding(name, "missing", key, f"PEFT expects it ({list(shape)}) for this config on the base."))
        elif saved[key] != shape and math.prod(saved[key]) != 0:  # empty tensors are reported already
            out.append(Finding(name, "shape", key, f"is {list(saved[key])}, the base model needs {list(shape)}."))
    for key in sorted(set(saved) - set(expected) - known):
        out.append(Finding(name, "unexpected", key, "not a tensor of this config on the base: PEFT ignores it."))
    return out


# --- entry points ------------------------------------------------------------------------------------------


def verify_adapter(
    path: str | os.PathLike, *, base: str | None = None, allow_pickle: bool = False, checkpoint_notes: bool = True
) -> Report:
    """Check every adapter under `path` (the folder `save_pretrained` wrote); `base` (a local folder with
    config.json, or a Hub id in the local cache) adds the check against the base model's structure.

    Raises `VerifyError` when an adapter cannot be read at all; problems in readable adapters are findings.
    With `checkpoint_notes`, `path` being Trainer's checkpoint-N/ whose FSDP checkpoint lacks the LoRA weights
    (accelerate's FSDP1 adapter-only save) adds a note saying so and which adapter to use.
    """
    root = Path(os.fspath(path))
    report = Report(str(root), base)
    adapters = [(name, directory, _read_config(directory)) for name, directory in _adapter_dirs(root)]
    base_config = _base_config(base) if base is not None else None
    for name, directory, config in adapters:
        summary, findings = _check_adapter(name, directory, config, allow_pickle)
        if base_config is not None:
            expected, known = _expected_state(base_config, directory)
            found = {(f.kind, f.key) for f in findings}
            findings += [
                f
                for f in _base_findings(name, directory / summary.file, expected, known, allow_pickle)
                if ("shape", f.key) not in found or f.kind != "shape"
            ]
        report.adapters.append(summary)
        report.findings += findings
    if checkpoint_notes and any(p.name.startswith("pytorch_model_fsdp") for p in root.iterdir()):
        from shardsave.formats.sources import fsdp1_lora_gap

        gap = fsdp1_lora_gap(root)
        if gap is not None:
            report.notes.append(f"{gap} {callback_adapter(root, sound=report.sound)}")
    return report


def callback_adapter(folder: Path, sound: bool | None = None) -> str:
    """Where in Trainer's `folder` (a checkpoint-N/) the adapter shardsave's ShardSaveCallback writes is, and
    what to do with it; `sound`: what verify found in the folder's own adapter, if known."""
    out = []
    weights = next((folder / n for n in (SAFETENSORS_NAME, BIN_NAME) if (folder / n).is_file()), None)
    if weights is not None and (folder / CONFIG_NAME).is_file():
        if sound is None:
            try:
                sound = verify_adapter(folder, checkpoint_notes=False).sound
            except VerifyError:
                sound = False
        out.append(
            f"The adapter file {weights} is what shardsave's ShardSaveCallback writes there, if it ran: "
            + ("`python -m shardsave.verify` finds it sound; use it as it is." if sound else
               f"`python -m shardsave.verify {folder}` finds problems in it (not ShardSaveCallback's, then).")
        )  # fmt: skip
    shards = folder / "adapter_shards"
    if (shards / MANIFEST_NAME).is_file():
        out.append(
            f"ShardSaveCallback(shards=True) wrote the adapter's shards to {shards}: write the adapter from them "
            f"with `python -m shardsave.merge {shards} -o OUT`."
        )
    elif not sound:
        out.append(
            f"No adapter ShardSaveCallback wrote is in {folder}: the LoRA weights of this training are lost. Add "
            f"shardsave.integrations.ShardSaveCallback() to the Trainer's callbacks (it writes a correct adapter "
            f"into every checkpoint-N/ and restores it on resume), or train with FSDP2 (fsdp_version: 2)."
        )
    return " ".join(out)


def _subject(finding: Finding) -> str:
    if finding.key is None:
        return f"adapter {finding.adapter!r}"
    return finding.key if finding.adapter == "default" else f"{finding.key} (adapter {finding.adapter!r})"


def warn_findings(findings: Sequence[Finding], where: str | os.PathLike) -> None:
    """Log one warning on the `shardsave` logger listing `findings` (the first 20) about the adapter written to
    `where`; nothing when there are none. A save or merge calls it on what it wrote and still publishes: the
    problems may be intended (an untrained adapter), and only the user can tell."""
    if not findings:
        return
    lines = [f"  [{f.kind}] {_subject(f)}: {f.message}" for f in findings[:_MAX_WARNED]]
    if len(findings) > _MAX_WARNED:
        lines.append(f"  ... and {len(findings) - _MAX_WARNED} more")
    where = os.fspath(where)
    logger.warning(
        "%d problem(s) in the adapter written to %s (it was written all the same; `python -m shardsave.verify %s` "
        "checks it again):\n%s",
        len(findings),
        where,
        shlex.quote(where),
        "\n".join(lines),
        extra={"writer": True},
    )
