"""SP-correct causal-LM loss and the gradient scale DeepSpeed needs for it.

Target (what DDP over the dp groups computes): each DP group ``g`` has the HF token-mean loss of its
micro-batch, ``L_g = sum_t CE_t / N_g`` with ``N_g`` the valid (non -100) tokens of the whole
sequences; the step's gradient is ``mean_g grad(L_g)``.

Under SP, rank ``r`` of group ``g`` only has the CE of its shard. We give every rank the tensor

    loss_r = local_sum_r / N_g  +  stopgrad(L_g - local_sum_r / N_g)

whose *value* is ``L_g`` on every rank of the group (so logging, progress bars and callbacks see the
real loss) and whose *gradient* is only the shard's own term. Summing the ranks' gradients over the
SP group gives ``grad(L_g)`` exactly; ``N_g`` and the sum come from non-differentiable all-reduces,
so no collective runs in backward. A group with no valid token gets loss 0 and zero gradient.

How DeepSpeed then combines the ranks' gradients depends on the ZeRO stage and its settings; the
factor that makes the result ``mean_g grad(L_g)`` is :func:`deepspeed_loss_scale`, the only place
that knows it (tests measure it against DeepSpeed with plain SGD for every stage/setting).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_ulysses.parallel.sharding import IGNORE_INDEX


def _all_reduce_sum(t: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def count_valid_tokens(shift_labels: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Valid label count of the whole sequences (summed over the SP group), as an int64 tensor."""
    local = (shift_labels != IGNORE_INDEX).sum().to(torch.int64)
    return _all_reduce_sum(local, group)


def sp_token_mean(
    local_sum: Tensor,
    num_valid: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    grad_normalizer: Optional[float] = None,
) -> Tensor:
    """``local_sum / N`` for the gradient, ``(sum over the SP group) / N`` for the value.

    ``local_sum`` is the differentiable sum of per-token losses on this shard, ``num_valid`` the
    group-wide valid token count (:func:`count_valid_tokens`). NaN-safe: ``N == 0`` gives 0.
    ``grad_normalizer`` replaces ``N`` for the gradient only (``loss_normalization="global_tokens"``,
    :mod:`lightning_ulysses.parallel.step_context`); the value is still the token mean.
    """
    denom = torch.as_tensor(num_valid, device=local_sum.device).clamp(min=1).to(local_sum.dtype)
    value = _all_reduce_sum((local_sum / denom).detach(), group)
    grad_denom = denom if grad_normalizer is None else max(float(grad_normalizer), 1e-12)
    local = local_sum / grad_denom
    return local + (value - local.detach())


def normalize_sp_loss(
    local_sum: Tensor,
    shift_labels: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    num_valid: Optional[Tensor] = None,
) -> Tensor:
    """The one rule both loss paths use: the strategy's :class:`~lightning_ulysses.parallel.step_context.StepContext`
    for these labels when there is one (its token count and gradient normaliser), else count here."""
    from lightning_ulysses.parallel.step_context import step_context_for

    ctx = step_context_for(shift_labels) if num_valid is None else None
    if ctx is not None:
        return sp_token_mean(local_sum, torch.tensor(ctx.num_valid_tokens), ctx.sp_group, ctx.grad_normalizer)
    if num_valid is None:
        num_valid = count_valid_tokens(shift_labels, group)
    return sp_token_mean(local_sum, num_valid, group)


def sp_causal_lm_loss(
    logits: Tensor,
    shift_labels: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    num_valid: Optional[Tensor] = None,
) -> Tensor:
    """Token-mean cross-entropy of a sequence-sharded causal LM (see module docstring).

    ``logits`` ``[b, c, V]`` and ``shift_labels`` ``[b, c]`` are this rank's shard (labels already
    shifted over the *full* sequence, as :func:`lightning_ulysses.parallel.sharding.prepare_batch` does). With
    ``group=None`` this is exactly HF's causal-LM loss of the batch. Given the ``shift_labels`` of a
    batch the strategy prepared, the token count and the gradient normalisation of the strategy's
    ``loss_normalization`` come from the batch's step context (no collective for the count).
    """
    from transformers.loss.loss_utils import fixed_cross_entropy

    # HF's CE upcasts to fp32 and with num_items_in_batch=1 returns the plain sum over valid tokens.
    local_sum = fixed_cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        shift_labels.reshape(-1).to(logits.device),
        num_items_in_batch=1,
        ignore_index=IGNORE_INDEX,
    )
    return normalize_sp_loss(local_sum, shift_labels, group, num_valid)


def deepspeed_loss_scale(zero_config: Mapping[str, Any], sp: int) -> float:
    """Factor to multiply each rank's :func:`sp_token_mean` loss by before ``engine.backward``.

    DeepSpeed 0.19 with a sequence-parallel ``mpu`` reduces gradients over all ``sp * dp`` ranks:

    * ZeRO 0/1/2, and ZeRO-3 with ``reduce_scatter=False`` + ``contiguous_gradients=True``: sum over
      the world divided by ``dp`` -> already ``mean_g grad(L_g)``: factor 1.
    * ZeRO-3 otherwise (its default reduce-scatter): sum divided by the *world*, i.e. it also averages
      over the SP replicas -> factor ``sp``.
    """
    stage = int(zero_config.get("stage", 0) or 0)
    if stage != 3 or sp == 1:
        return 1.0
    reduce_scatter = zero_config.get("reduce_scatter", True)
    contiguous = zero_config.get("contiguous_gradients", True)
    if not reduce_scatter and contiguous:
        return 1.0
    return float(sp)


__all__ = ["count_valid_tokens", "normalize_sp_loss", "sp_token_mean", "sp_causal_lm_loss", "deepspeed_loss_scale"]
