"""What the loss and the attention need to know about the micro-batch being run, built once where it is sharded.

The strategy prepares every batch on the *full* sequences before sharding it (:mod:`lightning_ulysses.parallel.sharding`),
so it knows exactly, without any collective, how many tokens of the DP group's micro-batch carry a label.
It records that, and how the loss must be normalised (``loss_normalization``), in a :class:`StepContext`
that the two loss paths (:func:`lightning_ulysses.parallel.loss.sp_causal_lm_loss` and the tiled loss) read: the
one route by which a loss learns its SP group. Under Ulysses it also holds the batch's *global* position ids and
packed-segment bounds (from the full batch, before sharding), which every attention layer reads instead of
gathering the shards' positions back.

The context is tied to the ``shift_labels`` tensor the strategy put in the batch (its storage): a loss
computed on any other labels (a second forward, a teacher) ignores it and counts its own tokens, so a stale
context can never mis-normalise a different batch.

Normalisation (``loss_normalization``), for ``A`` micro-batches per optimizer step and ``dp`` DP groups:

* ``"batch_mean"`` (Lightning DDP's semantics, the default): each micro-batch's loss is the token mean of
  its own sequences; the step's gradient is the mean over the ``A x dp`` micro-batches. Every micro-batch
  weighs the same, however many tokens it has.
* ``"global_tokens"``: every valid token of the optimizer step weighs the same: the gradient is
  ``sum(CE) / N`` with ``N`` the valid tokens of all micro-batches of the step on all DP ranks (HF's
  fixed gradient accumulation, torchtitan). Use it when lengths vary (SFT, packed rows with padding):
  with ``batch_mean`` a short sample's tokens count more than a long one's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

LOSS_NORMALIZATIONS = ("batch_mean", "global_tokens")


@dataclass(frozen=True)
class StepContext:
    """The micro-batch's normalisation facts.

    Attributes:
        shift_labels: this rank's ``[b, S/sp]`` labels tensor the context belongs to (identity-checked).
        sp_group: the SP group whose ranks share these sequences (``None`` when sp == 1).
        num_valid_tokens: valid labels of the micro-batch's *full* sequences (the DP group's count).
        grad_normalizer: what this rank's summed CE is divided by *for the gradient*; the loss *value*
            stays the micro-batch's token mean. ``batch_mean``: ``num_valid_tokens``; ``global_tokens``:
            ``N / (dp * A)`` (Lightning divides by ``A``, the DP reduction by ``dp``).
        step_loss_weight: weight of this micro-batch's token-mean loss in the optimizer step's loss, averaged
            over DP groups (``None`` for ``batch_mean``: a plain mean over micro-batches).
        training: whether the batch is a training batch (evaluation batches are always token means).
        token_mask: this rank's ``[b, S/sp]`` real tokens (``False`` for padding: the user's right padding and
            the strategy's padding to ``pad_to_multiple_of``); losses over tokens rather than labels (the MoE
            router's balance term) use it.
        local_positions: this rank's ``[b, S/sp]`` ``position_ids`` (identity-checked like ``shift_labels``).
        global_positions: the full ``[b, S]`` position ids on the device (Ulysses layouts; ``None`` otherwise).
        segments: ``[b, S]`` packed-segment ids on the device, or ``None`` when no row is packed.
        segment_bounds: per row the ``(start, end)`` of each segment (host lists, for per-segment kernels).
        input_length: the batch's sequence length before the strategy padded it (what predictions are cut to).
        real_lengths: ``[b]`` tokens of each row before the user's right padding.
        token_index: ``[sp, S/sp]`` the full-sequence index of every rank's local tokens (sharding's layout), for
            :meth:`gather`.
        world_max_local_tokens: the most tokens any rank holds in this micro-batch (set when the tiled MLP runs on
            ZeRO-3 parameters: every rank must run as many tiles, each tile gathers the weights), so layers agree on
            their tile count without a collective of their own.
    """

    shift_labels: Tensor
    sp_group: Optional[dist.ProcessGroup]
    num_valid_tokens: int
    grad_normalizer: float
    step_loss_weight: Optional[float] = None
    training: bool = True
    token_mask: Optional[Tensor] = None
    local_positions: Optional[Tensor] = None
    global_positions: Optional[Tensor] = None
    segments: Optional[Tensor] = None
    segment_bounds: Optional[list] = None
    input_length: Optional[int] = None
    real_lengths: Optional[Tensor] = None
    token_index: Optional[Tensor] = None
    world_max_local_tokens: Optional[int] = None

    def gather(self, local: Tensor) -> Tensor:
        """This rank's ``[b, S/sp, ...]`` shard of a per-token output -> the full ``[b, S, ...]`` in sequence order
        (one all-gather over the SP group; not differentiable: for predictions)."""
        if self.sp_group is None or self.token_index is None:
            return local
        sp, c = self.token_index.shape
        parts = [torch.empty_like(local) for _ in range(sp)]
        dist.all_gather(parts, local.contiguous(), group=self.sp_group)
        full = torch.empty((local.shape[0], sp * c, *local.shape[2:]), dtype=local.dtype, device=local.device)
        full[:, self.token_index.reshape(-1).to(local.device)] = torch.cat(parts, dim=1)
        return full

    def applies_to(self, shift_labels: Tensor) -> bool:
        return _same(shift_labels, self.shift_labels)

    def positions_apply_to(self, position_ids: Tensor) -> bool:
        return self.local_positions is not None and _same(position_ids, self.local_positions)


def _same(t: Tensor, mine: Tensor) -> bool:
    # Same storage, not the same Python object: ZeRO-3's module hooks hand the model an alias of each input
    # tensor. The context holds its tensor, so that storage cannot be freed and reused meanwhile.
    return t is mine or (t.data_ptr() == mine.data_ptr() and t.shape == mine.shape and t.device == mine.device)


_current: Optional[StepContext] = None


def set_step_context(ctx: Optional[StepContext]) -> None:
    """Install the context of the batch about to run (the strategy does it in ``batch_to_device``)."""
    global _current
    _current = ctx


def step_context_for(shift_labels: Tensor) -> Optional[StepContext]:
    """The current context if it was built for exactly this labels tensor, else ``None``."""
    ctx = _current
    return ctx if ctx is not None and ctx.applies_to(shift_labels) else None


def current_step_context() -> Optional[StepContext]:
    return _current


def max_over_world(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks (one all-reduce; ``value`` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


__all__ = ["LOSS_NORMALIZATIONS", "StepContext", "current_step_context", "max_over_world", "set_step_context",
           "step_context_for"]
