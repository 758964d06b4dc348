"""transformers' private APIs (checked against transformers 5.0-5.x)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch

CHECKED = "transformers>=5.0,<6"


class _AttentionFunctions:
    """``ALL_ATTENTION_FUNCTIONS`` (transformers' process-wide attention registry): read an entry, replace one.

    A built-in entry lives in the registry's ``_local_mapping`` (assigning an item overrides it there); a name
    registered by a library goes through ``AttentionInterface.register``.
    """

    def get(self, impl: str) -> Optional[Callable]:
        """The registered entry, or None ("eager" has none until one is set: layers use their own function)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS else None

    def set(self, impl: str, fn: Callable) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

        if impl in ALL_ATTENTION_FUNCTIONS._local_mapping:
            ALL_ATTENTION_FUNCTIONS[impl] = fn
        else:
            AttentionInterface.register(impl, fn)


class _MaskFunctions:
    """``ALL_MASK_ATTENTION_FUNCTIONS``: the mask builders ``create_causal_mask`` picks by attention implementation."""

    def get(self, impl: str) -> Optional[Callable]:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        return ALL_MASK_ATTENTION_FUNCTIONS[impl] if impl in ALL_MASK_ATTENTION_FUNCTIONS else None

    def set(self, impl: str, fn: Callable) -> None:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        # an item set on the registry instance overrides the class-level entry (its ``_local_mapping``); the
        # early exit of ``create_causal_mask`` checks the class-level names only, so the name stays "known"
        ALL_MASK_ATTENTION_FUNCTIONS[impl] = fn


_FUNCTIONS = _AttentionFunctions()
_MASKS = _MaskFunctions()


def attention_functions() -> _AttentionFunctions:
    return _FUNCTIONS


def mask_functions() -> _MaskFunctions:
    return _MASKS


def eager_attention_of(module: torch.nn.Module) -> Callable:
    """The eager attention a layer falls back to: transformers registers no "eager" entry; each modeling file
    defines its own ``eager_attention_forward`` (Gemma-2's soft-caps the logits) and passes it to
    ``ALL_ATTENTION_FUNCTIONS.get_interface`` as the default."""
    import sys

    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(
            f"{type(module).__name__} ({type(module).__module__}) defines no eager_attention_forward, so its eager "
            "attention cannot be routed through sequence parallelism; build the model with "
            "attn_implementation='sdpa' or 'flash_attention_2'."
        )
    return fn


def attn_implementation(obj: Any, default: Optional[str] = None) -> Optional[str]:
    """The attention implementation a model, module or config runs (``config._attn_implementation``)."""
    config = getattr(obj, "config", obj)
    return getattr(config, "_attn_implementation", default)


def register_varlen_attention(name: str, fn: Callable) -> bool:
    """Register ``fn`` under ``name`` as an attention that takes packed segments (``cu_seq_lens_q``); False (nothing
    registered) when this transformers would not hand it the segments.

    Modules that pack segments (the Qwen-VL vision towers' windows and frames) pass ``cu_seqlens`` only to
    implementations ``is_flash_attention_requested`` accepts, which in transformers 5 means a name containing
    "flash"; any other implementation gets one call per segment."""
    from transformers.utils.generic import is_flash_attention_requested

    if not is_flash_attention_requested(requested_attention_implementation=name):
        return False
    attention_functions().set(name, fn)
    return True


def set_attn_implementation(config: Any, name: str) -> None:
    """Make the modules built from ``config`` (a sub-config: a vision tower's) run the attention registered as
    ``name``: they read ``config._attn_implementation`` on every call; transformers' setter checks nothing."""
    config._attn_implementation = name


def block_class_names(model: torch.nn.Module) -> frozenset[str]:
    """The class names of ``model``'s repeated blocks: its ``_no_split_modules`` (what transformers' device map keeps
    whole on one device: decoder layers, a vision tower's blocks); empty when it names none."""
    return frozenset(getattr(model, "_no_split_modules", None) or ())


@contextmanager
def kv_groups(module: torch.nn.Module, groups: int) -> Iterator[None]:
    """HF's eager and sdpa kernels repeat K/V by ``module.num_key_value_groups`` (query heads per kv head); after
    Ulysses' head split the local ratio can differ from the model's, so it is set for the call and restored."""
    restore = getattr(module, "num_key_value_groups", groups)
    if restore == groups:
        yield
        return
    module.num_key_value_groups = groups
    try:
        yield
    finally:
        module.num_key_value_groups = restore


def checkpointed_layers(model: torch.nn.Module) -> list:
    """The repeated decoder blocks HF checkpoints one by one (``GradientCheckpointingLayer``), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def rope_index(inner: torch.nn.Module, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
               image_grid_thw: Optional[torch.Tensor], video_grid_thw: Optional[torch.Tensor],
               second_per_grid_ts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[3, b, n]`` multimodal rotary positions of a Qwen-VL model's ``get_rope_index`` (its arguments changed
    across transformers releases: ``mm_token_type_ids`` is taken where it exists, video timing where it does)."""
    import inspect

    accepted = inspect.signature(inner.get_rope_index).parameters
    kwargs: dict[str, Any] = {"image_grid_thw": image_grid_thw, "video_grid_thw": video_grid_thw}
    if "mm_token_type_ids" in accepted:
        kwargs["mm_token_type_ids"] = mm_token_type_ids
    if second_per_grid_ts is not None and "second_per_grid_ts" in accepted:
        kwargs["second_per_grid_ts"] = second_per_grid_ts
    return inner.get_rope_index(input_ids, **kwargs)[0]


def auto_model_mapping(auto_class: Any) -> Any:
    """The lazy config -> model class mapping of an ``AutoModelFor...`` class (indexing it imports the module)."""
    return auto_class._model_mapping


def multimodal_output(inner: torch.nn.Module, out: Any) -> Any:
    """The language model's output as the output type of the VLM's inner model (its outer forward reads fields
    such as ``image_outputs`` or ``rope_deltas`` that releases add and rename), those fields left empty."""
    import sys

    module = sys.modules[type(inner).__module__]
    prefix = type(inner).__name__[: -len("Model")] if type(inner).__name__.endswith("Model") else ""
    for name in ("MultimodalBaseModelOutputWithPast", f"{prefix}ModelOutputWithPast"):
        kind = getattr(module, name, None)
        if kind is not None:
            return kind(**out)
    return out


def set_checkpoint_function(layer: torch.nn.Module, fn: Callable) -> None:
    """The checkpoint function one HF layer calls (``gradient_checkpointing_enable`` gives all layers the same)."""
    layer._gradient_checkpointing_func = fn


def fixed_cross_entropy() -> Callable:
    """transformers' summed/averaged cross-entropy helper (the one its ``ForCausalLMLoss`` uses)."""
    from transformers.loss.loss_utils import fixed_cross_entropy as fn

    return fn


class TransformersZero3:
    """Keeps transformers' DeepSpeed ZeRO-3 integration switched on (``HfDeepSpeedConfig``).

    While it is on, ``from_pretrained`` / ``from_config`` build the model partitioned (``deepspeed.zero.Init``),
    load each checkpoint tensor into its shards and run the model's own weight init on gathered parameters;
    without it they see the empty tensors of an enclosing ``zero.Init`` and fail (size mismatch) or skip the init.
    transformers finds the config through a module-level weak reference, so this object holds the strong one.
    """

    def __init__(self) -> None:
        self._config: Any = None

    def enable(self, ds_config: dict) -> None:
        from transformers.integrations import HfDeepSpeedConfig

        self._config = HfDeepSpeedConfig(ds_config)

    def disable(self) -> None:
        if self._config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._config = None

    @property
    def enabled(self) -> bool:
        return self._config is not None


def tied_weight_keys(model: Any) -> set[str]:
    """The parameter names ``model`` ties to others (``_tied_weights_keys``: a list or a {target: source} dict)."""
    return set(getattr(model, "_tied_weights_keys", None) or [])


def has_input_grads_hook(model: Any) -> bool:
    """Whether transformers' ``enable_input_require_grads`` hook is on ``model`` (kept in private attributes)."""
    return bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))


def drop_input_grads_hooks(model: Any, modules: set[int]) -> int:
    """Remove the ``enable_input_require_grads`` hooks that sit on the modules whose ``id()`` is in ``modules``;
    how many were removed. transformers 5 hooks the input embeddings of *every* pretrained sub-model (a vision
    tower's patch embedding too) and keeps the handles in ``_require_grads_hooks``."""
    handles = list(getattr(model, "_require_grads_hooks", None) or [])
    if not handles or not modules:
        return 0
    # a handle knows the hook dict it sits in, not its module: match the modules' dicts
    theirs = {id(m._forward_hooks) for m in model.modules() if id(m) in modules}
    keep, drop = [], []
    for handle in handles:
        (drop if id(handle.hooks_dict_ref()) in theirs else keep).append(handle)
    for handle in drop:
        handle.remove()
    model._require_grads_hooks = keep
    if hasattr(model, "_require_grads_hook"):  # transformers' single-hook alias (backward compatibility)
        if keep:
            model._require_grads_hook = keep[0]
        else:
            del model._require_grads_hook
    return len(drop)


@contextmanager
def plain_model_init() -> Iterator[None]:
    """Build models as plain (unpartitioned) modules while a ZeRO-3 run is live: transformers' integration
    (``is_deepspeed_zero3_enabled``, read through the module-level weak reference ``HfDeepSpeedConfig`` sets) would
    otherwise wrap ``from_config`` in ``deepspeed.zero.Init``, a collective that only the building rank enters."""
    from transformers.integrations import deepspeed as hf_ds

    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        from lightning_ulysses.compat.deepspeed import zero_init_paused

        with zero_init_paused():
            yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


__all__ = ["CHECKED", "TransformersZero3", "attention_functions", "attn_implementation", "auto_model_mapping",
           "block_class_names",
           "checkpointed_layers", "drop_input_grads_hooks", "fixed_cross_entropy", "has_input_grads_hook",
           "kv_groups", "mask_functions", "multimodal_output", "plain_model_init", "register_varlen_attention",
           "rope_index", "set_attn_implementation", "set_checkpoint_function", "tied_weight_keys"]
