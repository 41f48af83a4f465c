"""Every difference between the library versions shardsave supports, in one place.

shardsave reproduces PEFT's files byte for byte, so what PEFT writes is a function of PEFT's version. The rest of
the package asks here (by feature, never by version number), and this module either looks the answer up in the
installed PEFT or switches on its version. `check_peft` runs before the first save or load: a PEFT older than
`PEFT_OLDEST` is refused, one newer than the newest tested release series gets a warning naming the tested range.
Likewise for transformers 5: how its `save_pretrained` writes a base model's keys (`hf_saved_keys`), and the model
types whose bases need none of its weight conversions (`HF_PLAIN_CAUSAL_LM`, checked against it by a test).
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
import warnings
from dataclasses import dataclass

from packaging.version import Version

from shardsave.errors import NewerThanTestedWarning, UnsupportedVersionError

__all__ = [
    "PEFT_OLDEST",
    "PEFT_NEWEST_TESTED",
    "UnsupportedVersionError",
    "NewerThanTestedWarning",
    "check_peft",
    "installed_peft_version",
    "peft_support",
    "PeftRules",
    "peft_rules",
    "peft_model_tags",
    "hf_saved_keys",
    "HF_PLAIN_CAUSAL_LM",
    "HF_TIED_HEAD",
    "HF_LEGACY_RENAMES",
    "transformers_version",
]

PEFT_OLDEST = "0.15.0"  # pyproject.toml's floor: the oldest release whose files the parity tests reproduce
PEFT_NEWEST_TESTED = "0.21.2"  # the newest release the parity tests ran against; its series (0.21.x) is tested


def peft_support(version: str) -> str | None:
    """None for a PEFT `version` inside the tested range; else why not ("older" / "newer" and the range).
    Pure, so the rule is testable without installing another PEFT."""
    found = Version(version)
    newest = Version(PEFT_NEWEST_TESTED)
    tested = f"{PEFT_OLDEST} to {newest.major}.{newest.minor}.x"
    if found < Version(PEFT_OLDEST):
        return f"peft {version} is older than shardsave supports (tested: {tested})"
    if found.release[:2] > newest.release[:2]:
        return f"peft {version} is newer than shardsave was tested with (tested: {tested})"
    return None


def installed_peft_version() -> str:
    """The installed PEFT's version: `peft.__version__` once peft is imported, else its distribution's metadata
    (asking costs no `import peft`, seconds)."""
    imported = sys.modules.get("peft")
    return imported.__version__ if imported is not None else importlib.metadata.version("peft")


@functools.cache
def check_peft() -> None:
    """Refuse a PEFT older than supported; warn once for one newer than tested (its files may differ from what
    shardsave writes: tests/save/test_save_matches_peft.py tells)."""
    import peft

    problem = peft_support(peft.__version__)
    if problem is None:
        return
    if Version(peft.__version__) < Version(PEFT_OLDEST):
        raise UnsupportedVersionError(f"{problem}: upgrade it (pip install 'peft>={PEFT_OLDEST}').")
    warnings.warn(
        f"{problem}: its adapter files may differ from what shardsave writes. Run shardsave's "
        f"tests/save/test_save_matches_peft.py to check, or pin 'peft<={PEFT_NEWEST_TESTED}'.",
        NewerThanTestedWarning,
        stacklevel=3,
    )


@dataclass(frozen=True, slots=True)
class PeftRules:
    """How a PEFT release writes an adapter, where the supported releases differ (each field: the release that
    changed it, and what it does from then on)."""

    embedding_target_by_module: bool
    """0.17: "embedding targeted" is decided for every `save_embedding_layers` (before: only for "auto"), a
    regex `target_modules` is matched against the module names (before: searched for the names as text), and
    LoRA's `trainable_token_indices` counts as trainable tokens (before: only the TRAINABLE_TOKENS type)."""
    embedding_keys_by_prefix: bool
    """0.21: an embedding layer's tensors are those under its module name (before: every name containing it)."""
    lora_only_saves_base_bias: bool
    """0.21: `bias="lora_only"` saves each LoRA layer's `base_layer.bias` (before: no bias at all)."""
    empty_base_name_is_none: bool
    """0.21: an empty base model name is written as null and skips the vocabulary check (before: "" is written
    and looked up like any other name)."""
    config_from_json_known: bool
    """0.21 only: `LoraConfig.__post_init__` read for what it does to a config loaded from JSON (the rescue's
    writer without peft, `formats.peft_json`, reproduces it); other releases' configs go through PEFT."""


def peft_rules(version: str | None = None) -> PeftRules:
    """The rules of PEFT `version` (default: the installed one). Pure for a given version."""
    if version is None:
        version = installed_peft_version()
    release = Version(version).release[:2]
    return PeftRules(
        embedding_target_by_module=release >= (0, 17),
        embedding_keys_by_prefix=release >= (0, 21),
        lora_only_saves_base_bias=release >= (0, 21),
        empty_base_name_is_none=release >= (0, 21),
        config_from_json_known=release == (0, 21),
    )


def peft_model_tags(peft_model) -> tuple[str, ...]:
    """The tags PEFT's model card adds for the tuner type (PEFT 0.16+; none before)."""
    method = getattr(type(peft_model), "_get_peft_specific_model_tags", None)
    return tuple(method(peft_model)) if method is not None else ()


def hf_saved_keys(model) -> list[str]:
    """The keys transformers' `save_pretrained` writes for `model` (a base model, e.g. on the meta device), in its
    order: tied copies left out, its weight conversion reverted. Needs transformers 5 (where save_pretrained does
    both); an older one is refused by name rather than guessed at."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict, revert_weight_conversion
    except ImportError:
        import transformers

        raise UnsupportedVersionError(
            f"writing merged weights reproduces transformers 5's save_pretrained; transformers "
            f"{transformers.__version__} is installed. Install transformers>=5 for save_merged / merge --into."
        ) from None
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return list(revert_weight_conversion(model, state))


#: Model types whose base `merge --into` may describe from its files alone (`shardsave.formats.hf_base`): model
#: type -> the class `AutoModelForCausalLM` builds for it. transformers 5 converts none of their weights on load
#: (no checkpoint conversion mapping for the type or the classes), and their only tied weight is the head.
#: tests/formats/test_hf_base.py checks every entry against the installed transformers.
HF_PLAIN_CAUSAL_LM = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}

#: The tied key of those classes and its source, as `all_tied_weights_keys` holds it with tie_word_embeddings.
HF_TIED_HEAD = ("lm_head.weight", "model.embed_tokens.weight")

#: The source patterns of transformers 5's "legacy" renamings, applied to every model on load (and reverted on
#: save): a base key matching one is converted, so the files alone do not describe it (checked by the same test).
HF_LEGACY_RENAMES = (
    "LayerNorm.gamma",
    "LayerNorm.beta",
    ".weight_g",
    ".weight_v",
    r"^model\.language_model\.model",
    r"^language_model\.model\.model",
)


def transformers_version() -> str | None:
    """The installed transformers' version, from its metadata (transformers is not imported); None if absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None
