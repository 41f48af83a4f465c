"""A model's structure without its weights: the base model's config, the model built on the meta device.

`verify --base` and the rescue of adapters from framework checkpoints need what PEFT would build for an adapter
config on a base model (`peft_skeleton`: its parameter names and shapes, where its embeddings are); the merged
writers need the base model class itself (`meta_model`: the keys, tied weights and parameter count its
`save_pretrained` writes). Neither loads or downloads a byte of the base: the config comes from a local folder
or the local Hugging Face cache, the model is built on `torch.device("meta")` (a 70B skeleton costs
milliseconds and no memory). transformers and peft are imported when a skeleton is built, not before: the
jobs that need none (stitching shards, `verify` without `--base`) never import them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch

from shardsave.errors import SkeletonError
from shardsave.plan.structure import base_config_file

__all__ = ["SkeletonError", "base_config", "meta_model", "peft_skeleton"]

#: The transformers auto class PEFT's task types are trained with (AutoModelForCausalLM otherwise).
_AUTO_CLASS = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def base_config(base: str | Path, *, what: str = "--base"):
    """The base model's transformers config from `base`: a folder holding config.json, or a Hub id whose
    config.json is in the local cache. Nothing is downloaded."""
    from transformers import AutoConfig

    try:
        found = base_config_file(str(base))  # the folder's, else the local cache's (as PEFT looks it up)
    except Exception:  # not a repo id huggingface_hub accepts
        found = None
    if not isinstance(found, str):
        raise SkeletonError(
            f"{what} {base}: neither a folder with config.json nor a model in the local Hugging Face cache. "
            f"Nothing is downloaded: pass the base model's folder, or download its config.json first."
        )
    folder = Path(found).parent
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise SkeletonError(f"{what} {base}: its config.json cannot be read by transformers ({exc}).") from None


def meta_model(config, model_class: type | str = "AutoModelForCausalLM", *, dtype: torch.dtype | None = None):
    """The transformers model `model_class` (a model class, or the name of a transformers auto class) builds from
    `config`, on the meta device: every module, name and shape, no memory. `dtype` as `from_config(dtype=)`.
    The one builder of base-model skeletons (`peft_skeleton`, the offline and the live merged writers)."""
    kwargs = {} if dtype is None else {"dtype": dtype}
    with torch.device("meta"):
        if isinstance(model_class, str):
            import transformers

            return getattr(transformers, model_class).from_config(config, **kwargs)
        return model_class._from_config(config, **kwargs)


def peft_skeleton(config, adapters: Mapping[str, object], *, name_or_path: str | None = None, where: str = ""):
    """The PeftModel that `get_peft_model` (then `add_adapter` for each further adapter) builds on the base model
    of transformers `config`, on the meta device. `adapters`: adapter name -> `PeftConfig` (first one first); the
    model's `peft_config` holds them unchanged (structure-only settings, such as PiSSA initialisation, are
    neutralised on copies). `name_or_path` is what the base model was loaded from (the card's `base_model`)."""
    from peft import get_peft_model

    config = copy.deepcopy(config)
    config._name_or_path = name_or_path or ""
    (first, first_config), *rest = adapters.items()
    auto = _AUTO_CLASS.get(str(getattr(first_config, "task_type", None)), "AutoModelForCausalLM")

    def structural(peft_config):
        peft_config = copy.deepcopy(peft_config)
        if hasattr(peft_config, "init_lora_weights"):
            peft_config.init_lora_weights = True  # the structure only: PiSSA/LoftQ initialisations need weights
        return peft_config

    try:
        model = meta_model(config, auto)
        with torch.device("meta"):
            model.name_or_path = config._name_or_path
            peft_model = get_peft_model(model, structural(first_config), adapter_name=first)
            for name, peft_config in rest:
                peft_model.add_adapter(name, structural(peft_config))
    except Exception as exc:
        raise SkeletonError(
            f"{where or 'the adapter config'}: PEFT cannot apply it to the base model "
            f"({type(exc).__name__}: {exc}); it was not trained on this base."
        ) from None
    for name, peft_config in adapters.items():
        peft_model.peft_config[name] = peft_config
    return peft_model
