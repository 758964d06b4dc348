"""Tiled logits + cross-entropy: the loss of a causal LM without materialising ``[tokens, vocab]`` logits.

For a 128K-vocab model, the fp32 logits of a 64K-token shard alone are 32 GiB (and their gradient as
much again). :class:`TiledLinearCrossEntropy` computes ``lm_head`` + CE in token tiles: forward keeps
only the hidden states; backward recomputes each tile's logits, turns them into ``d logits`` and
accumulates ``d hidden`` and ``d weight`` (fp32) tile by tile. Peak extra memory is one tile.

Two things DeepSpeed's ``TiledFusedLogitsLoss`` gets wrong and this gets right:

* the upstream gradient is honoured (DeepSpeed computes lm_head's gradient inside forward assuming
  ``d loss = 1``, so dividing its output by the token count leaves lm_head's gradient unscaled);
* parameters receive exactly one gradient per backward, as from an ordinary op, so ZeRO-1/2/3 and
  DDP hooks fire once and no ``ds_grad_is_ready`` bookkeeping is needed.

ZeRO-3 gathers a parameter only while its own module runs. The function is therefore applied *inside*
``lm_head``'s forward: :func:`enable_tiled_loss` swaps the ``lm_head`` instance's class for a subclass
whose forward takes optional labels (state dict, hooks and plain calls are unchanged).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ulysses.parallel.sharding import IGNORE_INDEX, labelled_index
from lightning_ulysses.kernels.impl import check_impl, use_liger
from lightning_ulysses.memory.module_swap import is_swapped, restore_class, settings, swap_class
from lightning_ulysses.memory.trick import MemoryTrick

# fp32 elements of one logits tile: 2^28 = 1 GiB (and as much for its softmax/grad in backward)
DEFAULT_TILE_ELEMENTS = 2**28


def tile_size(num_tokens: int, vocab: int, tile_tokens: Optional[int] = None) -> int:
    if tile_tokens is not None:
        if tile_tokens < 1:
            raise ValueError(f"tile_tokens must be >= 1, got {tile_tokens}.")
        return tile_tokens
    return max(1, min(num_tokens, DEFAULT_TILE_ELEMENTS // max(vocab, 1)))


class TiledLinearCrossEntropy(torch.autograd.Function):
    """``sum_t CE(scale * (hidden_t @ W^T + b), label_t)`` over valid tokens, computed in token tiles; with
    ``per_token`` the ``[N]`` CE of each token instead of the sum (0 for ignored tokens: the negated log-probs of
    :func:`lightning_ulysses.parallel.logprobs.token_logprobs`; ``scale`` is its ``1 / temperature``).

    Shapes: ``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``labels [N]`` -> scalar (or ``[N]``), fp32.
    """

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, tile: int,
        fp32_weight_grad: bool = False, per_token: bool = False, scale: float = 1.0,
    ) -> Tensor:
        n = hidden.shape[0]
        out = torch.zeros(n if per_token else (), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, tile):
            logits = F.linear(hidden[s : s + tile], weight, bias).float()  # [t, V] fp32, one tile only
            if scale != 1.0:
                logits.mul_(scale)
            ce = F.cross_entropy(logits, labels[s : s + tile], ignore_index=IGNORE_INDEX,
                                 reduction="none" if per_token else "sum")
            if per_token:
                out[s : s + tile] = ce
            else:
                out += ce
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.tile, ctx.fp32_weight_grad, ctx.per_token, ctx.scale = tile, fp32_weight_grad, per_token, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, labels = ctx.saved_tensors
        tile, scale = ctx.tile, ctx.scale
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # the weight gradient is accumulated over tiles in the weight's dtype by default, as DeepSpeed and Liger
        # do: an fp32 [vocab, hidden] buffer costs 2 GiB more for Llama-3-8B (measured: our +3 GiB vs the
        # reference at 64K tokens); fp32_weight_grad=True trades that memory for fewer roundings
        acc_dtype = torch.float32 if ctx.fp32_weight_grad else weight.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if (need_b and bias is not None) else None
        for s in range(0, hidden.shape[0], tile):
            h = hidden[s : s + tile]
            y = labels[s : s + tile]
            # d CE / d logits = softmax - onehot on valid rows, 0 on ignored rows; times the upstream gradient (one
            # number, or one per token) and the scale. The softmax runs in place on the fp32 tile: torch.softmax
            # would hold a second [t, V] fp32 tile (1 GiB at the default tile) at the start of backward, where
            # every checkpoint is still live
            g = F.linear(h, weight, bias).float()  # [t, V]
            if scale != 1.0:
                g.mul_(scale)
            g.sub_(g.amax(dim=-1, keepdim=True)).exp_()
            g.div_(g.sum(dim=-1, keepdim=True))
            valid = y != IGNORE_INDEX
            rows = torch.nonzero(valid, as_tuple=True)[0]
            g[rows, y[rows]] -= 1.0
            upstream = grad_out[s : s + tile].unsqueeze(1) if ctx.per_token else grad_out
            g.mul_(valid.unsqueeze(1).to(g.dtype) * upstream * scale)
            g = g.to(weight.dtype)  # the unfused path runs these matmuls in the weight dtype too
            if need_h:
                grad_h[s : s + tile] = g @ weight  # [t, V] @ [V, H]
            if need_w:  # [V, t] @ [t, H] into the accumulator: no [V, H] temporary (1 GiB for Llama-3-8B)
                if acc_dtype == g.dtype:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += (g.t() @ h).to(acc_dtype)
            if grad_b is not None:
                grad_b += g.float().sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy_sum(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, tile_tokens: Optional[int] = None,
    impl: str = "auto",
) -> Tensor:
    """Sum of CE over valid tokens of ``hidden [..., H]`` / ``labels [...]``, tiled (or Liger-fused)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    # tokens without a label (prompts, user turns, padding, image tokens) skip the lm_head: their logits would only be
    # masked out. All of this runs inside one lm_head call, so under ZeRO-3 ranks with fewer labels still gather its
    # weight exactly once; a rank without any keeps the whole shard (its backward still gives the head a gradient)
    keep = labelled_index(y)
    if keep is not None and keep.numel() > 0:
        h, y = h.index_select(0, keep), y.index_select(0, keep)
    if use_liger(impl, h, "tiled loss"):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(h, weight, y, bias=bias, ignore_index=IGNORE_INDEX, reduction="sum").float()
    return TiledLinearCrossEntropy.apply(h, weight, bias, y, tile_size(h.shape[0], weight.shape[0], tile_tokens))


# ------------------------------------------------------------------------------------ lm_head swap
KIND = "TiledLoss"


def _head_subclass(cls: type) -> type:
    class Head(cls):  # type: ignore[misc, valid-type]
        """``lm_head`` that, given ``labels=``, returns the summed CE instead of logits."""

        def forward(self, input: Tensor, labels: Optional[Tensor] = None, **kwargs: Any) -> Tensor:  # noqa: A002
            if labels is None:
                return super().forward(input)
            return linear_cross_entropy_sum(
                input, self.weight, getattr(self, "bias", None), labels,
                settings(self)["loss_tile_tokens"], settings(self)["loss_impl"],
            )

    return Head


def _check_supported(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no linear output embedding (lm_head); disable tiled_loss.")
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise ValueError(
                f"{type(model).__name__} transforms its logits ({attr}={getattr(cfg, attr)}), which the tiled loss "
                "does not reproduce; set tiled_loss=False for this model."
            )
    return head


def _tiled_causal_lm_forward(
    self: torch.nn.Module,
    input_ids: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    position_ids: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    shift_labels: Optional[Tensor] = None,
    num_items_in_batch: Optional[Tensor] = None,
    **kwargs: Any,
):
    """HF causal-LM forward that, when labels are given, returns the loss without logits.

    Same loss as HF (token mean over valid labels, or ``sum / num_items_in_batch``); under Ulysses
    (``apply_ulysses``) it is the SP-group token mean of :mod:`lightning_ulysses.parallel.loss`.
    """
    original = settings(self)["plain_forward"]
    if labels is None and shift_labels is None:
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from lightning_ulysses.kernels.dispatch import sp_attention_of
    from lightning_ulysses.parallel.loss import normalize_sp_loss

    kwargs.pop("logits_to_keep", None)
    kwargs.setdefault("use_cache", False)
    out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    if shift_labels is None:
        shift_labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    loss_sum = self.get_output_embeddings()(out.last_hidden_state, labels=shift_labels)
    # the SP group comes from the batch's step context (normalize_sp_loss); without one (Ulysses applied by
    # hand, no strategy) from the model's own Ulysses attention
    handler = sp_attention_of(self)
    group = handler.sp_group if handler is not None else None
    n = torch.as_tensor(num_items_in_batch) if num_items_in_batch is not None else None
    loss = normalize_sp_loss(loss_sum, shift_labels, group, n)
    if getattr(out, "router_logits", None) is not None:  # MoE: the caller adds the router's balance term
        from transformers.modeling_outputs import MoeCausalLMOutputWithPast

        return MoeCausalLMOutputWithPast(
            loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None), attentions=getattr(out, "attentions", None),
            router_logits=out.router_logits,
        )
    return CausalLMOutputWithPast(
        loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None), attentions=getattr(out, "attentions", None),
    )


def enable_tiled_loss(model: torch.nn.Module, tile_tokens: Optional[int] = None, impl: str = "auto") -> torch.nn.Module:
    """Make ``model(..., labels=...)`` (or ``shift_labels=``) compute its loss tiled, without logits.

    Swaps the lm_head instance's class (see module docstring) and wraps this instance's ``forward``;
    calls without labels are untouched. Idempotent; :func:`disable_tiled_loss` undoes it.
    """
    import types

    check_impl(impl, "tiled loss")
    head = _check_supported(model)
    swap_class(head, KIND, _head_subclass)
    settings(head).update(loss_tile_tokens=tile_tokens, loss_impl=impl)
    if "plain_forward" not in settings(model):
        settings(model)["plain_forward"] = model.forward
        model.forward = types.MethodType(_tiled_causal_lm_forward, model)
    return head


def disable_tiled_loss(model: torch.nn.Module) -> None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        restore_class(head, KIND)
    if "plain_forward" in settings(model):
        del model.forward
        del settings(model)["plain_forward"]


def tiled_loss_enabled(model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and is_swapped(head, KIND)

class TiledLoss(MemoryTrick):
    """Tiled logits + cross-entropy: ``model(..., labels=...)`` returns the loss without ever materialising
    the ``[tokens, vocab]`` logits (``logits`` is None).

    Args:
        tile_tokens: tokens per tile; default keeps one fp32 logits tile at ~1 GiB.
        impl: ``"auto"`` (Liger's fused kernel when liger-kernel is installed and the model is on CUDA,
            else the torch implementation), ``"torch"`` or ``"liger"``.
    """

    order = 20
    flag = "tiled_loss"
    flag_options = {"tiled_loss_tile_tokens": "tile_tokens", "tiled_loss_impl": "impl"}
    on_under_sp = True

    def __init__(self, tile_tokens: Optional[int] = None, impl: str = "auto") -> None:
        check_impl(impl, "tiled loss")
        if tile_tokens is not None and tile_tokens < 1:
            raise ValueError(f"tiled loss tile_tokens must be a positive int or None, got {tile_tokens}.")
        self.tile_tokens = tile_tokens
        self.impl = impl

    def apply(self, model: torch.nn.Module) -> None:
        enable_tiled_loss(model, self.tile_tokens, self.impl)

    def remove(self, model: torch.nn.Module) -> None:
        disable_tiled_loss(model)


__all__ = [
    "TiledLoss",
    "TiledLinearCrossEntropy",
    "disable_tiled_loss",
    "enable_tiled_loss",
    "linear_cross_entropy_sum",
    "tile_size",
    "tiled_loss_enabled",
]
