"""Gradient checkpointing of HF decoder layers: the policies (``full``, ``save_attention``) and their switches.

Shared by the :class:`~lightning_ulysses.memory.tricks.GradientCheckpointing` and
:class:`~lightning_ulysses.memory.tricks.ActivationOffload` tricks, the throughput counter (what is
recomputed) and the benchmarks.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from lightning_ulysses.compat.transformers import (
    checkpointed_layers, drop_input_grads_hooks, has_input_grads_hook, set_checkpoint_function,
)
from lightning_ulysses.memory.module_swap import settings
from lightning_ulysses.memory.trick import MemoryTrick

CHECKPOINT_POLICIES = ("full", "save_attention")
_KEEP = object()  # "leave the layer count already in force"


@functools.lru_cache(maxsize=1)
def attention_kernel_ops() -> frozenset:
    """The aten (and flash-attn) ops that compute attention *with* a log-sum-exp output.

    ``F.scaled_dot_product_attention`` dispatches to one of these (the math fallback decomposes into
    matmuls and is not caught). Their outputs (attention output, log-sum-exp, RNG state) are exactly
    what their backward needs besides q/k/v.
    """
    names = [
        ("aten", "_scaled_dot_product_flash_attention"),
        ("aten", "_scaled_dot_product_cudnn_attention"),
        ("aten", "_scaled_dot_product_efficient_attention"),
        ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
        ("aten", "_scaled_dot_product_fused_attention_overrideable"),
        ("flash_attn", "_flash_attn_forward"),
        ("flash_attn", "_flash_attn_varlen_forward"),
        ("flash_attn_3", "fwd"),
    ]
    ops = set()
    for ns, name in names:
        try:
            packet = getattr(getattr(torch.ops, ns), name)
        except (AttributeError, RuntimeError):
            continue
        ops.add(packet)
        ops.update(getattr(packet, o) for o in packet.overloads())
    return frozenset(ops)


def _save_attention_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in attention_kernel_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(policy: str = "full") -> dict:
    """Non-reentrant checkpointing (transformers 5's default) with torch's *early stop* left on.

    ``policy="save_attention"``: torch's selective activation checkpointing keeps the outputs of the
    attention kernel (output + log-sum-exp, ``[b, h/sp, S, d]`` + ``[b, h/sp, S]`` per layer and
    rank) from the forward, so the recompute in backward re-runs projections, norms, MLP and the
    all-to-alls but not attention, which is ~80% of the FLOPs at 256K tokens. Memory: one attention
    output per layer, i.e. ``2 * hidden`` bytes per local token per layer in bf16.

    Early stop must stay on under ZeRO-3: with ``early_stop=False`` the recompute runs past the point
    where DeepSpeed expects it to end and meets released (size-0) parameters.
    """
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"checkpoint policy must be one of {list(CHECKPOINT_POLICIES)}, got {policy!r}.")
    kwargs: dict = {"use_reentrant": False}
    if policy == "save_attention":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_attention_policy)
    return kwargs


def enable_gradient_checkpointing(model: torch.nn.Module, policy: Optional[str] = None,
                                  save_attention_layers: Any = _KEEP) -> None:
    """HF gradient checkpointing of every decoder layer with :func:`checkpoint_kwargs` (idempotent).

    ``policy=None`` keeps the policy already in force (callers that only need checkpointing *on*, such
    as the activation offload, must not undo a ``save_attention`` chosen elsewhere), else ``"full"``.

    ``save_attention_layers=N`` (with ``save_attention``): only the first ``N`` decoder layers keep their
    attention outputs, the others recompute attention like ``"full"``. The kept outputs are all alive at
    the end of the forward, so the memory they cost is ``N`` attention outputs whichever layers keep them,
    and each layer left out gives back one (and costs one attention recompute). ``None``: every layer.
    Left out, the count already in force is kept.

    transformers >= 5.2x names it ``activation_checkpointing_enable`` (the old name warns); older 5.x
    releases only have ``gradient_checkpointing_enable``.
    """
    if policy is None:
        policy = checkpoint_policy_of(model) or "full"
    if save_attention_layers is _KEEP:  # a count only means something under the policy it was chosen for
        save_attention_layers = settings(model).get("save_attention_layers") if policy == "save_attention" else None
    check_save_attention_layers(policy, save_attention_layers)
    # transformers hooks the input embeddings to require grad on every enable (removed again below); a hook there
    # before is the user's own and stays with everything transformers adds
    users_hook = has_input_grads_hook(model)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs(policy))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(policy))
    if not users_hook:
        # transformers hooks every input embedding (a vision tower's patch embedding too) so that its output requires
        # grad -- which only reentrant checkpointing needs; non-reentrant checkpointing gives the parameters inside a
        # layer their gradients whatever its input. With the embedding frozen (LoRA, a frozen tower) the hook makes
        # its output a leaf that requires grad: autograd holds it for the whole step (the offloaded layer input's GPU
        # copy stays: 2 bytes x hidden per token) and backward computes a [tokens, hidden] gradient nothing uses; a
        # frozen tower would build its whole graph (~20 GiB of checkpointed block inputs for Qwen2.5-VL-7B at 64K
        # tokens) and run a recompute and backward for it. Drop them all.
        drop_input_grads_hooks(model, {id(m) for m in model.modules()})
    settings(model).update(checkpoint_policy=policy, save_attention_layers=save_attention_layers)
    if policy == "save_attention":
        from torch.utils.checkpoint import checkpoint

        # HF gave every layer the same checkpoint function. A vision tower's blocks recompute everything (their
        # attention spans one window or frame: cheap to recompute, and N layers means N *decoder* layers); with
        # save_attention_layers=N, so do the decoder layers past N
        full = functools.partial(checkpoint, **checkpoint_kwargs("full"))
        decoder = decoder_layers(model)
        tower = [layer for layer in checkpointed_layers(model) if all(layer is not d for d in decoder)]
        for layer in tower + (decoder[save_attention_layers:] if save_attention_layers is not None else []):
            set_checkpoint_function(layer, full)


def decoder_layers(model: torch.nn.Module) -> list:
    """The checkpointed decoder layers, in order: a vision-language model's tower blocks left out."""
    from lightning_ulysses.models.multimodal import tower_module_ids

    tower = tower_module_ids(model)
    return [layer for layer in checkpointed_layers(model) if id(layer) not in tower]


def check_save_attention_layers(policy: str, save_attention_layers: Optional[int]) -> None:
    """The one validation of ``save_attention_layers`` (the trick and the model function share it)."""
    if save_attention_layers is None:
        return
    if policy != "save_attention":
        raise ValueError(
            f"save_attention_layers={save_attention_layers!r} needs policy='save_attention' (the strategy's "
            "checkpoint_policy): it chooses how many layers keep attention outputs; set that policy or drop the option."
        )
    if isinstance(save_attention_layers, bool) or not isinstance(save_attention_layers, int) or save_attention_layers < 0:
        raise ValueError(f"save_attention_layers must be a layer count >= 0 or None, got {save_attention_layers!r}.")


def saved_attention_fraction(model: torch.nn.Module) -> float:
    """Share of decoder layers whose attention outputs are kept (1.0 under ``save_attention`` for all)."""
    if checkpoint_policy_of(model) != "save_attention":
        return 0.0
    n = settings(model).get("save_attention_layers")
    layers = len(decoder_layers(model))
    return 1.0 if n is None or layers == 0 else min(n, layers) / layers


def disable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether any submodule checkpoints (what HF's ``is_activation/gradient_checkpointing`` test, without the
    deprecation warning of the old name)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def checkpoint_policy_of(model: torch.nn.Module) -> Optional[str]:
    """``"full"`` / ``"save_attention"`` when checkpointing is on, else None."""
    if not is_checkpointing(model):
        return None
    return settings(model).get("checkpoint_policy", "full")


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and count the bytes autograd keeps for backward while it runs: ``(output, bytes)``.

    Every tensor an op saves passes through the saved-tensor pack hook; views of one storage are
    counted each time they are saved (an upper bound, exact for the ops measured here).
    """
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


class GradientCheckpointing(MemoryTrick):
    """Non-reentrant gradient checkpointing of every decoder layer (HF's own mechanism).

    Args:
        policy: ``"full"`` recomputes the whole layer in backward; ``"save_attention"`` keeps the
            attention kernel's output and log-sum-exp from the forward (selective checkpointing), so
            attention is not recomputed: faster at long sequences for one attention output per layer.
        save_attention_layers: with ``"save_attention"``, keep the attention outputs of the first this many
            decoder layers only (the rest recompute attention): a dial between the speed of keeping them
            all and the memory of keeping none. ``None``: every layer.
    """

    order = 10  # first: the offload and the FLOP count read the policy it sets
    flag = "gradient_checkpointing"
    flag_options = {"checkpoint_policy": "policy", "save_attention_layers": "save_attention_layers"}
    on_under_sp = True

    def __init__(self, policy: str = "full", save_attention_layers: Optional[int] = None) -> None:
        checkpoint_kwargs(policy)  # validates the name at construction
        check_save_attention_layers(policy, save_attention_layers)
        self.policy = policy
        self.save_attention_layers = save_attention_layers

    def apply(self, model: torch.nn.Module) -> None:
        enable_gradient_checkpointing(model, self.policy, self.save_attention_layers)

    def remove(self, model: torch.nn.Module) -> None:
        disable_gradient_checkpointing(model)

    @classmethod
    def recomputed_flops(cls, model: torch.nn.Module, dims: Any, tokens: float, sum_sq_len: float) -> float:
        # whoever turned checkpointing on (this trick, the offload, the LightningModule): one more forward, less
        # the attention of the layers that keep their outputs
        if checkpoint_policy_of(model) is None:
            return 0.0
        from lightning_ulysses.models.flops import recompute_flops

        return recompute_flops(dims, tokens, sum_sq_len, attention=1.0 - saved_attention_fraction(model))


__all__ = [
    "CHECKPOINT_POLICIES",
    "GradientCheckpointing",
    "attention_kernel_ops",
    "check_save_attention_layers",
    "checkpoint_kwargs",
    "decoder_layers",
    "checkpoint_policy_of",
    "checkpointed_layers",
    "disable_gradient_checkpointing",
    "enable_gradient_checkpointing",
    "is_checkpointing",
    "saved_attention_fraction",
    "saved_tensor_bytes",
]
