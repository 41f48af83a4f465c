"""Read a model's structure once: where the PeftModel is, and which modules play which PEFT role.

This is the only module (apart from the collectors) that walks live modules. It turns them into a small,
frozen `Layout` of canonical names, so that key selection (`shardsave.plan.keys`) is a pure function and
every rank derives the same plan without moving a tensor.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

from torch import nn

from shardsave.compat import PeftRules, check_peft, peft_rules
from shardsave.plan.names import canonical_name, is_under

__all__ = [
    "Layout",
    "TunerModule",
    "AuxModule",
    "EmbeddingLayer",
    "peel",
    "find_peft_model",
    "build_layout",
    "resolve_save_embedding_layers",
    "targets_embedding",
    "base_config_file",
]

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # what PEFT treats as embedding layers
ALL_LINEAR = "all-linear"
CONFIG_FILE = "config.json"  # a transformers model's config, as PEFT looks it up
_NOT_ADAPTER_STATE = ("base_layer", "model")  # the wrapped module of a tuner layer / tuner model


@dataclass(frozen=True, slots=True)
class TunerModule:
    """A PEFT tuner layer (e.g. a LoRA Linear) or tuner model, by canonical path.

    `members` are its children, parameters and buffers except the wrapped base layer; `keyed` maps each
    member that is a per-adapter container (`ModuleDict`, `ParameterDict`, `BufferDict`) to its adapter names.
    """

    path: str
    members: tuple[str, ...]
    keyed: dict[str, frozenset[str]]
    is_layer: bool
    inside_aux: bool


@dataclass(frozen=True, slots=True)
class AuxModule:
    """A `modules_to_save` copy or a trainable-tokens wrapper, saved apart from the tuner layers."""

    path: str
    kind: str  # "modules_to_save" | "trainable_tokens"
    adapters: frozenset[str]
    tied: bool


@dataclass(frozen=True, slots=True)
class EmbeddingLayer:
    """The input or output embedding, as PEFT locates it: `name` is the first module that is the layer or
    its base layer, `base_name` the first that is its base layer."""

    name: str | None
    base_name: str | None
    has_valid_base: bool


@dataclass(frozen=True, slots=True)
class Layout:
    tuners: tuple[TunerModule, ...]
    aux: tuple[AuxModule, ...]
    embeddings: tuple[EmbeddingLayer, ...]
    embedding_candidates: tuple[str, ...]  # base-model module names ending in embed_tokens / lm_head


def _is_deepspeed_engine(module: object) -> bool:
    return any(cls.__name__ in ("DeepSpeedEngine", "PipelineEngine") for cls in type(module).__mro__)


def peel(model: nn.Module) -> nn.Module:
    """Remove the outer wrappers that only prefix names: DDP / DataParallel, a DeepSpeed engine, and
    `torch.compile`'s `OptimizedModule`. FSDP1 is kept: its collector needs it."""
    from torch._dynamo.eval_frame import OptimizedModule

    seen = 0
    while seen < 16:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or _is_deepspeed_engine(model):
            model = model.module
        elif isinstance(model, OptimizedModule):
            model = model._orig_mod
        else:
            return model
    return model


def find_peft_model(model: nn.Module):
    """The `PeftModel` inside `model`, whatever wraps it (DDP, DeepSpeed, FSDP1, compile, checkpointing)."""
    from peft import PeftModel

    check_peft()
    current = peel(model)
    for _ in range(16):
        if isinstance(current, PeftModel):
            return current
        for attr in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "module"):
            inner = getattr(current, "_modules", {}).get(attr)
            if inner is not None:
                current = peel(inner)
                break
        else:
            break
    raise TypeError(
        f"Expected a peft.PeftModel (or DDP / FSDP / DeepSpeed / torch.compile wrapping one), got "
        f"{type(model).__module__}.{type(model).__name__}. Wrap your model with peft.get_peft_model(...) "
        f"first, or use shardsave.gather_state_dict(model) to collect arbitrary trainable parameters."
    )


def _keyed_members(module: nn.Module) -> dict[str, frozenset[str]]:
    from peft.tuners._buffer_dict import BufferDict

    return {
        name: frozenset(child.keys())
        for name, child in module.named_children()
        if isinstance(child, (nn.ModuleDict, nn.ParameterDict, BufferDict))
    }


def _members(module: nn.Module) -> tuple[str, ...]:
    names = [n for n, _ in module.named_children()]
    names += [n for n, p in module._parameters.items() if p is not None]
    names += [n for n, b in module._buffers.items() if b is not None]
    return tuple(n for n in dict.fromkeys(names) if n not in _NOT_ADAPTER_STATE)


def _walk(root: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """`(canonical path, module, first)` for every module under every name (`named_modules(
    remove_duplicate=False)` order); `first` marks the entries `named_modules()` itself would list (a module
    reached again is dropped there with everything below it)."""
    out, seen, skip = [], set(), None
    for raw, module in root.named_modules(remove_duplicate=False):
        first = False
        if skip is None or not (raw == skip or raw.startswith(skip + ".")):
            skip = None
            if id(module) in seen:
                skip = raw
            else:
                seen.add(id(module))
                first = True
        out.append((canonical_name(raw), module, first))
    return out


def build_layout(peft_model) -> Layout:
    """Structural facts about `peft_model`, under canonical names (wrapper components removed). One walk of
    the module tree: on a 200M-parameter model each walk costs about a millisecond."""
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, TrainableTokensWrapper

    walked = _walk(peft_model)
    tuners: list[TunerModule] = []
    aux: list[AuxModule] = []
    aux_paths: set[str] = set()
    for path, module, _ in walked:
        if isinstance(module, AuxiliaryTrainingWrapper):
            aux_paths.add(path)
            if isinstance(module, ModulesToSaveWrapper):
                aux.append(AuxModule(path, "modules_to_save", frozenset(module.modules_to_save.keys()), False))
            elif isinstance(module, TrainableTokensWrapper):
                tied = bool(getattr(module.token_adapter, "tied_adapter", None))
                aux.append(AuxModule(path, "trainable_tokens", frozenset(module._adapters), tied))
            # also record its per-adapter containers, so other adapters' copies are recognised
            tuners.append(TunerModule(path, (), _keyed_members(module), False, True))
        elif isinstance(module, (BaseTuner, BaseTunerLayer)):
            inside = is_under(path, aux_paths)
            is_layer = isinstance(module, BaseTunerLayer)
            tuners.append(TunerModule(path, _members(module), _keyed_members(module), is_layer, inside))

    named = [(path, module) for path, module, first in walked if first]
    embeddings = []
    if hasattr(peft_model, "get_input_embeddings"):
        for layer in (_safe_call(peft_model, "get_input_embeddings"), _safe_call(peft_model, "get_output_embeddings")):
            if layer is None:
                continue
            base = getattr(layer, "base_layer", None)
            name = next((n for n, m in named if m is layer or (base is not None and m is base)), None)
            base_name = next((n for n, m in named if base is not None and m is base), None)
            valid = isinstance(base, (nn.Linear, nn.Embedding))
            embeddings.append(EmbeddingLayer(name, base_name, valid))

    return Layout(tuple(tuners), tuple(aux), tuple(embeddings), _embedding_candidates(peft_model, named))


def _embedding_candidates(peft_model, named: list[tuple[str, nn.Module]]) -> tuple[str, ...]:
    """Names, relative to the base model, of its modules that PEFT would take for embedding layers."""
    base_model = peft_model.get_base_model()
    base_path = next((n for n, m in named if m is base_model), None)
    if base_path is None:  # not inside the walked tree: walk it on its own
        named = [(canonical_name(n), m) for n, m in base_model.named_modules()]
        base_path = ""
    prefix = f"{base_path}." if base_path else ""
    pattern = re.compile(r"(.*\.)?(" + "|".join(EMBEDDING_LAYER_NAMES) + r")$")
    relative = (n[len(prefix) :] for n, _ in named if n.startswith(prefix) and n != base_path)
    return tuple(dict.fromkeys(n for n in relative if pattern.match(n)))


def _safe_call(obj, method: str):
    try:
        return getattr(obj, method)()
    except (AttributeError, NotImplementedError):
        return None


def embedding_is_targeted(target_modules, candidates: tuple[str, ...], rules: PeftRules | None = None) -> bool:
    """Whether a LoRA config targets an embedding layer, by the rule of the PEFT release `rules` describes."""
    rules = rules or peft_rules()
    if not rules.embedding_target_by_module:  # the names searched for in the string or collection as given
        return bool(target_modules) and any(name in target_modules for name in EMBEDDING_LAYER_NAMES)
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        return any(re.fullmatch(target_modules, name) for name in candidates)
    if target_modules:
        return any(name in target_modules for name in EMBEDDING_LAYER_NAMES)
    return False


def _trainable_tokens(config, rules: PeftRules) -> bool:
    return str(getattr(config, "peft_type", "")).endswith("TRAINABLE_TOKENS") or (
        rules.embedding_target_by_module and getattr(config, "trainable_token_indices", None) is not None
    )


def targets_embedding(value, *, config, candidates: tuple[str, ...], rules: PeftRules) -> bool:
    """Whether PEFT saves an embedding layer as targeted (its base layer's tensors, if valid) rather than whole
    when `save_embedding_layers=value` saves embeddings: before 0.17 only an "auto" decided by the targets."""
    targeted = embedding_is_targeted(getattr(config, "target_modules", None), candidates, rules)
    if rules.embedding_target_by_module:
        return targeted
    return value == "auto" and targeted and not _trainable_tokens(config, rules)


def resolve_save_embedding_layers(
    value, *, config, peft_model, candidates: tuple[str, ...], rules: PeftRules | None = None
) -> tuple[bool, bool]:
    """`(save_embeddings, embedding_targeted)` for one adapter, deciding `"auto"` as the PEFT release `rules`
    describes (default: the installed one) does.

    PEFT's vocab-size check compares with the base model's `config.json`, asking the Hub for it when the base
    is a Hub id. shardsave never leaves the machine: it reads that file from a local directory or from the
    local Hugging Face cache (`base_config_file`), which gives PEFT's answer with the Hub reachable whenever
    the base model was loaded on this machine. A config found in neither is treated as PEFT treats it
    offline: a warning, and the vocabulary assumed unchanged.
    """
    if value not in ("auto", True, False):
        raise ValueError(f"save_embedding_layers must be 'auto', True or False, got {value!r}.")
    rules = rules or peft_rules()
    targeted = targets_embedding(value, config=config, candidates=candidates, rules=rules)
    if value != "auto":
        return bool(value), targeted
    if targeted and not _trainable_tokens(config, rules):
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.", stacklevel=3
        )
        return True, targeted

    model_config = getattr(peft_model, "config", None)
    vocab_size = getattr(model_config, "vocab_size", None)
    model_id = getattr(config, "base_model_name_or_path", None)
    if model_id is None or (not model_id and rules.empty_base_name_is_none):
        return False, targeted
    found = base_config_file(model_id, revision=getattr(config, "revision", None))
    if found is None:
        warnings.warn(
            f"Could not find a config file in {model_id} - will assume that the vocabulary was not modified.",
            stacklevel=3,
        )
        return False, targeted
    if not found or not model_id:  # the cache records that the repository has no config.json: PEFT, online,
        return False, targeted  # finds none either; an empty name (before 0.21) is looked up but not compared
    if vocab_size and vocab_size != type(model_config).from_pretrained(os.path.dirname(found)).vocab_size:
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as the embedding layer has been resized during finetuning.",
            stacklevel=3,
        )
        return True, targeted
    return False, targeted


def base_config_file(model_id: str, *, revision: str | None = None) -> str | bool | None:
    """The base model's `config.json` without touching the network: in the directory `model_id`, else in the
    local Hugging Face cache (huggingface_hub's, so `HF_HUB_CACHE` / `HF_HOME` as it read them) for the Hub
    id `model_id` at `main` (the revision PEFT reads), then at `revision` (the adapter config's, if any).

    Returns the file's path; False when the cache records that the repository has no such file; None when
    it is not on this machine (or `model_id` is neither a directory nor a valid Hub id).
    """
    local = os.path.join(model_id, CONFIG_FILE)
    if os.path.exists(local):
        return local
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    for rev in dict.fromkeys(r for r in ("main", revision) if r):
        try:
            found = try_to_load_from_cache(model_id, CONFIG_FILE, revision=rev)
        except HFValidationError:  # a missing local path, not a Hub id: PEFT's Hub check fails the same way
            return None
        if isinstance(found, str):
            return found
        if found is not None:  # huggingface_hub's marker for a file known not to exist
            return False
    return None
