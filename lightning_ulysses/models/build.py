"""Building a Hugging Face causal LM from what a user gives (a hub name or directory, a config dict, a
``PretrainedConfig``, a model instance, a PEFT model), and recording how to rebuild it as plain data."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from lightning_ulysses.models.adapters import is_peft_model

ModelSpec = Union[str, dict[str, Any], Any]


def build_causal_lm(
    model: ModelSpec,
    attn_implementation: Optional[str] = None,
    dtype: Optional[str] = None,
    trust_remote_code: bool = False,
):
    """An HF causal LM from a hub name / local path (``from_pretrained``), a config dict
    (``{"model_type": "llama", ...}``), a ``PretrainedConfig`` (``from_config``), or an existing model instance
    (a ``PreTrainedModel`` or a PEFT model wrapping one; returned as is, attention switched if asked).

    Under ``UlyssesDeepSpeedStrategy`` with ZeRO-3 this runs with transformers' ZeRO-3 integration on: the
    model is built partitioned, checkpoints load into the partitions, and from a config the model's own
    weight init runs (on gathered parameters). ``trust_remote_code`` is passed to transformers only when set.
    """
    from transformers import PretrainedConfig, PreTrainedModel

    from lightning_ulysses.compat.transformers import attn_implementation as current_attn

    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if isinstance(model, PreTrainedModel) or is_peft_model(model):
        hf = model.get_base_model() if is_peft_model(model) else model
        if attn_implementation is not None and current_attn(hf) != attn_implementation:
            hf.set_attn_implementation(attn_implementation)
        return model
    if isinstance(model, dict):
        model = config_of(model)
    if isinstance(model, PretrainedConfig):
        return _auto_class(model).from_config(model, **kwargs)
    if isinstance(model, str):
        return _auto_class(config_of(model, trust_remote_code)).from_pretrained(model, **kwargs)
    raise TypeError(
        f"Cannot build a causal LM from {type(model).__name__}; pass a name/path, dict, config, PreTrainedModel or "
        "PEFT model."
    )


def _auto_class(config: Any) -> Any:
    """``AutoModelForImageTextToText`` for the vision-language families the strategy shards
    (:data:`lightning_ulysses.models.multimodal.SUPPORTED_VLMS`), ``AutoModelForCausalLM`` otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from lightning_ulysses.models.multimodal import SUPPORTED_VLMS

    return AutoModelForImageTextToText if getattr(config, "model_type", None) in SUPPORTED_VLMS else AutoModelForCausalLM


def model_record(model: ModelSpec) -> Union[str, dict[str, Any]]:
    """What rebuilds ``model``'s architecture, as plain data: a hub name / path as is, a config dict as is, a
    ``PretrainedConfig`` or a model instance (a PEFT model: its base model) as its config's ``to_dict()``."""
    from transformers import PretrainedConfig, PreTrainedModel

    if is_peft_model(model):
        model = model.get_base_model()
    if isinstance(model, PreTrainedModel):
        model = model.config
    if isinstance(model, PretrainedConfig):
        return model.to_dict()
    return model


def config_of(spec: ModelSpec, trust_remote_code: bool = False) -> Any:
    """The ``PretrainedConfig`` of a model spec (a name / directory / ``config.json``, a config dict, a config, an
    instance or PEFT model)."""
    from transformers import AutoConfig, PretrainedConfig

    if is_peft_model(spec):
        spec = spec.get_base_model()
    if isinstance(getattr(spec, "config", None), PretrainedConfig):
        return spec.config
    if isinstance(spec, PretrainedConfig):
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        if "model_type" not in spec:
            raise ValueError("A model config dict needs a 'model_type' key (e.g. 'llama', 'qwen3', 'mistral').")
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    if isinstance(spec, str):
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    raise TypeError(f"Cannot tell a model config from {type(spec).__name__}; pass a name/path, dict, config or model.")


def import_model_code(spec: ModelSpec, trust_remote_code: bool = False) -> None:
    """Import the transformers modelling module of ``spec``'s architecture now, outside any ``deepspeed.zero.Init``.

    A modelling module first imported inside ``zero.Init`` defines its classes there: DeepSpeed records each new
    class's ``__init__`` before the class decorators run (the ``kernels`` package's ``use_kernelized_func`` wraps
    ``__init__`` of e.g. ``LlamaAttention``) and puts the undecorated one back when the context exits, so models
    built after the fit (an evaluation copy, an export) lack the decorator's state and fail in forward."""
    if trust_remote_code or isinstance(spec, torch.nn.Module):
        return  # remote code is imported by from_pretrained itself; an instance's code is imported already
    from lightning_ulysses.compat.transformers import auto_model_mapping

    config = config_of(spec)
    mapping = auto_model_mapping(_auto_class(config))
    if type(config) in mapping:
        mapping[type(config)]  # the lazy mapping imports the modelling module


__all__ = ["ModelSpec", "build_causal_lm", "config_of", "import_model_code", "model_record"]
