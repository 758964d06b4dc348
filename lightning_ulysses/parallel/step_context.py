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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_ulysses.kernels.tiled import segment_bounds
from lightning_ulysses.parallel.sharding import (
    IGNORE_INDEX, packed_segments, real_token_mask, shard_sequence, shard_token_index,
)

if TYPE_CHECKING:
    from lightning_ulysses.parallel.layout import ProcessGroups

LOSS_NORMALIZATIONS = ("batch_mean", "global_tokens")


def check_loss_normalization(value: str) -> None:
    if value not in LOSS_NORMALIZATIONS:
        raise ValueError(f"loss_normalization must be one of {list(LOSS_NORMALIZATIONS)}, got {value!r}.")


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


def build(
    *,
    batch: Any,
    full: Mapping[str, Any],
    local: Mapping[str, Any],
    groups: Optional[ProcessGroups],
    zigzag: bool = True,
    training: bool = True,
    loss_normalization: str = "batch_mean",
    window_tokens: Optional[int] = None,
    accumulate_grad_batches: int = 1,
    world_max_tokens: bool = False,
) -> StepContext:
    """The :class:`StepContext` of one micro-batch, built once where it is sharded.

    Args:
        batch: the batch as the data loader gave it (its own length and right padding).
        full: the prepared full batch (:func:`~lightning_ulysses.parallel.sharding.prepare_for_sharding`), ``[b, S]``.
        local: this rank's shard of ``full`` (``[b, S/sp]``), already on its device.
        groups: the process groups (``None``: one process, no layout resolved).
        zigzag: the ring's zigzag layout (sharding's).
        training: a training batch (``loss_normalization`` applies; evaluation batches are token means).
        window_tokens: with ``loss_normalization="global_tokens"``, this DP rank's valid tokens in the optimizer
            step's accumulation window (:class:`~lightning_ulysses.parallel.accumulation.WindowTokenCounter`);
            summed over the DP group here (one all-reduce).
        accumulate_grad_batches: micro-batches per optimizer step.
        world_max_tokens: also find the most tokens any rank holds (one all-reduce over the world), for layers that
            must run the same number of tiles on every rank (the tiled MLP on ZeRO-3 parameters).
    """
    sp, sp_rank, ring = (groups.sp, groups.sp_rank, groups.ring) if groups is not None else (1, 0, 1)
    ids = local["input_ids"]  # [b, S/sp]
    seq_len = full["input_ids"].shape[1]
    num_valid = int((full["shift_labels"] != IGNORE_INDEX).sum())
    real = real_token_mask(batch, seq_len)  # [b, S] on the host: the user's right padding and ours are False
    grad_normalizer, step_loss_weight = loss_normalizer(
        num_valid, groups, training=training, loss_normalization=loss_normalization, window_tokens=window_tokens,
        accumulate_grad_batches=accumulate_grad_batches, device=ids.device,
    )
    return StepContext(
        shift_labels=local["shift_labels"],
        sp_group=groups.sp_group if groups is not None else None,
        num_valid_tokens=num_valid,
        grad_normalizer=grad_normalizer,
        step_loss_weight=step_loss_weight,
        training=training,
        token_mask=shard_sequence(real, sp_rank, sp, ring, zigzag).to(ids.device, non_blocking=True),
        input_length=_input_length(batch),
        real_lengths=real.sum(1),
        token_index=shard_token_index(seq_len, sp, ring, zigzag) if sp > 1 else None,
        world_max_local_tokens=max_over_world(ids.numel(), ids.device) if world_max_tokens else None,
        **(_positions(full, local, groups) if groups is not None else {}),
    )


def loss_normalizer(
    num_valid: int,
    groups: Optional[ProcessGroups],
    *,
    training: bool,
    loss_normalization: str,
    window_tokens: Optional[int],
    accumulate_grad_batches: int,
    device: torch.device,
) -> tuple[float, Optional[float]]:
    """``(grad_normalizer, step_loss_weight)`` of a micro-batch with ``num_valid`` labels (see :class:`StepContext`)."""
    if not (training and loss_normalization == "global_tokens"):
        return float(max(num_valid, 1)), None
    if window_tokens is None:
        raise RuntimeError(
            "loss_normalization='global_tokens' needs the training dataloader that the Trainer prepared (the "
            "strategy reads it one accumulation window ahead); the batch arrived from elsewhere."
        )
    window = torch.tensor(float(window_tokens), dtype=torch.float64, device=device)  # [] this DP rank's window
    dp = groups.dp if groups is not None else 1
    if dp > 1:
        dist.all_reduce(window, group=groups.dp_group)  # [] the step's valid tokens on all DP ranks
    total = max(float(window), 1.0)
    # Lightning divides the loss by `accumulate_grad_batches`, the DP reduction averages over `dp`: undo both here
    return total / (dp * accumulate_grad_batches), num_valid * dp / total


def _positions(full: Mapping[str, Any], local: Mapping[str, Any], groups: ProcessGroups) -> dict[str, Any]:
    """The full batch's position ids and packed segments (host-side bounds included), once per batch, for every
    attention layer of its forward and recompute (Ulysses, ring with packed rows, and packed rows at sp=1)."""
    device = local["position_ids"].device
    positions = full["position_ids"]  # [b, S]
    segments = packed_segments(positions)  # [b, S] or None
    return {
        "local_positions": local["position_ids"],
        "global_positions": local["position_ids"] if groups.sp == 1 else positions.to(device),
        "segments": segments.to(device) if segments is not None else None,
        # per-segment kernels under Ulysses alone; the ring finds its samples' runs itself
        "segment_bounds": segment_bounds(segments) if segments is not None and groups.ring == 1 else None,
    }


def _input_length(batch: Any) -> Optional[int]:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    return int(ids.shape[1]) if torch.is_tensor(ids) and ids.dim() == 2 else None


def max_over_world(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks (one all-reduce; ``value`` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


__all__ = ["LOSS_NORMALIZATIONS", "StepContext", "build", "check_loss_normalization", "current_step_context", "loss_normalizer", "max_over_world",
           "set_step_context", "step_context_for"]
