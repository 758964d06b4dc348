"""LoRA and other PEFT adapters: build a PEFT model from a config, recognise one, list what trains.

``peft`` is optional (``pip install lightning-ulysses[peft]``); nothing here imports it until an adapter is
asked for. The parallel core needs nothing special: a PEFT model wraps the Hugging Face model, whose
attention, MLP and norms the strategy and the memory tricks find as usual (:func:`find_hf_model` reaches the
wrapped ``PreTrainedModel``); the LoRA layers are ordinary submodules called by the projections they wrap.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch


def _peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA/PEFT needs the peft package: pip install 'lightning-ulysses[peft]' (or pip install peft).") from exc
    return peft


def is_peft_model(model: Any) -> bool:
    """A ``peft.PeftModel`` (checked without importing peft when it is not loaded)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def peft_config(spec: Any) -> Any:
    """A ``peft.PeftConfig`` from a config object, or a dict as YAML gives it: either peft's own form
    (``{peft_type: LORA, r: 16, target_modules: all-linear}``) or a class path
    (``{class_path: peft.LoraConfig, init_args: {r: 16}}``)."""
    peft = _peft()
    if isinstance(spec, peft.PeftConfig):
        return spec
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "class_path" in spec:
            import importlib

            module, _, name = str(spec["class_path"]).rpartition(".")
            cls = getattr(importlib.import_module(module or "peft"), name)
            return cls(**dict(spec.get("init_args") or {}))
        if "peft_type" not in spec:
            raise ValueError(
                "A PEFT config dict needs 'peft_type' (e.g. {peft_type: LORA, r: 16, target_modules: all-linear}) or "
                "'class_path' (e.g. {class_path: peft.LoraConfig, init_args: {r: 16}})."
            )
        spec.setdefault("task_type", "CAUSAL_LM")
        return peft.get_peft_config(spec)
    raise TypeError(f"peft must be a peft.PeftConfig or a dict, got {type(spec).__name__}.")


def adapter_config(model: Any) -> Any:
    """The ``PeftConfig`` of a PEFT model's one adapter (a model with several is refused: one trains at a time)."""
    configs = model.peft_config
    if len(configs) != 1:
        raise ValueError(f"The PEFT model has {len(configs)} adapters ({sorted(configs)}); train one adapter at a time.")
    return next(iter(configs.values()))


def peft_record(spec: Any) -> Any:
    """A PEFT config as plain data (what the module's hyperparameters keep, so export and ``load_from_checkpoint``
    rebuild the adapters): a dict as given (YAML), a ``PeftConfig`` as its ``to_dict()`` with enums as their values
    and sets as sorted lists. ``None`` stays ``None``."""
    if spec is None or isinstance(spec, Mapping):
        return None if spec is None else dict(spec)
    if not hasattr(spec, "to_dict"):
        raise TypeError(f"peft must be a peft.PeftConfig or a dict, got {type(spec).__name__}.")
    return {k: _plain(v) for k, v in spec.to_dict().items()}


def _plain(value: Any) -> Any:
    import enum

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def apply_peft(model: torch.nn.Module, spec: Any) -> torch.nn.Module:
    """Wrap ``model`` with the adapters of ``spec`` (:func:`peft_config`); base weights are frozen."""
    from lightning_ulysses.compat import zero_init_paused

    if is_peft_model(model):
        raise ValueError("The model is already a PEFT model; pass either a PEFT model or a peft config, not both.")
    config = peft_config(spec)
    # Under ZeRO-3 the base model is partitioned; the adapters are built whole (their init must not run on
    # empty partitions, e.g. lora_B's zeros) and partitioned by the DeepSpeed engine.
    with zero_init_paused():
        return _peft().get_peft_model(model, config)


def trainable_parameters(module: torch.nn.Module) -> Iterator[torch.nn.Parameter]:
    return (p for p in module.parameters() if p.requires_grad)


__all__ = ["adapter_config", "apply_peft", "is_peft_model", "peft_config", "peft_record", "trainable_parameters"]
