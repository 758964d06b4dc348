"""Log-probabilities of whole sequences under sequence parallelism: what preference, distillation and RL losses need.

Under SP each rank holds ``S/sp`` tokens of every sequence, so a sequence's log-probability ``sum_t log p(y_t | y<t)``
is a sum over the SP group. :func:`sequence_logprobs` gives every rank the whole sum (one all-reduce of
``[b, segments]`` numbers) with the gradient of its own tokens only, the convention of
:func:`lightning_ulysses.parallel.loss.sp_causal_lm_loss`: every rank computes the same loss from the same sums,
DeepSpeed adds up the SP ranks' gradients (:func:`~lightning_ulysses.parallel.loss.deepspeed_loss_scale`), and no
collective runs in backward.

``[S, V]`` logits are never whole: given hidden states and the ``lm_head``, tokens go through the head in tiles, each
tile recomputed in backward (:func:`token_logprobs`). Under ZeRO-3 the head is called as a module, so DeepSpeed gathers
its weight for each tile.

Shapes: ``hidden [b, s, H]`` (or ``logits [b, s, V]``), ``labels [b, s]`` already shifted (the strategy's
``shift_labels``: ``labels[t]`` is the token after ``t``; -100 is ignored), ``segment_ids [b, s]`` the packed sample
each token belongs to (0, 1, ...; one per row when ``None``).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_ulysses.compat.deepspeed import zero3_calls
from lightning_ulysses.parallel.sharding import IGNORE_INDEX, labelled_index

DEFAULT_TILE_TOKENS = 2048

Head = Union[torch.nn.Module, Callable[[Tensor], Tensor]]


def head_tiles(tokens: int, tile_tokens: int, *heads: Optional[Head], device: Optional[torch.device] = None
               ) -> list[tuple[int, int]]:
    """``(start, end)`` of the lm_head tiles over this rank's ``tokens``: ``ceil(tokens / tile_tokens)`` of them, or,
    where a head is ZeRO-3 partitioned, as many as the partition group's rank with the most
    (:func:`~lightning_ulysses.compat.deepspeed.zero3_calls`: each call all-gathers the head's weight; a rank with
    fewer tokens runs its last tiles empty)."""
    n = max(1, -(-tokens // tile_tokens))
    params = [p for h in heads if isinstance(h, torch.nn.Module) for p in h.parameters()]
    n = zero3_calls(n, params, device)
    return [(min(i * tile_tokens, tokens), min((i + 1) * tile_tokens, tokens)) for i in range(n)]


def _plain_linear(head: Optional[Head]) -> bool:
    """An ``nn.Linear`` lm_head with floating-point weights (not a PEFT or quantized wrapper): one that
    :func:`_through_head_once` can run as ``F.linear``."""
    return isinstance(head, torch.nn.Linear) and head.weight.dtype.is_floating_point


def _through_head_once(head: torch.nn.Linear, x: Tensor, labels: Tensor, tile_tokens: int, scale: float) -> Tensor:
    """``-log p(label)`` of every row of ``x [k, H]`` (``[k]`` fp32) in token tiles inside *one* call of ``head``.

    Under ZeRO-3 a module's weight is gathered only while it runs (and again for its backward): running every tile
    inside one call gathers the head's weight once per pass, on every rank alike, whatever its number of tokens (as the
    tiled loss does). The tiles are :class:`~lightning_ulysses.memory.tiled_loss.TiledLinearCrossEntropy`'s: forward
    keeps only ``x``, backward recomputes one ``[tile, V]`` tile at a time."""
    from lightning_ulysses.memory.tiled_loss import TiledLinearCrossEntropy

    def forward(hidden: Tensor) -> Tensor:
        return TiledLinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, tile_tokens, False, True, scale)

    own = head.__dict__.get("forward")  # an instance-level forward of someone else's, put back after
    head.forward = forward
    try:
        return head(x)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _tile(head: Optional[Head], x: Tensor, labels: Tensor, temperature: float, entropy: bool) -> tuple[Tensor, Tensor]:
    """One tile: ``x [t, H]`` (hidden, through ``head``) or ``[t, V]`` (logits) -> log p of the labels and the entropy
    of the distribution, ``[t]`` each, fp32."""
    logits = (head(x) if head is not None else x).float()  # [t, V], one tile only
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # [t]
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [t]
    logp = (picked - lse).masked_fill(labels == IGNORE_INDEX, 0.0)
    if not entropy:
        return logp, torch.zeros_like(logp)
    probs = torch.softmax(logits, dim=-1)
    return logp, lse - (probs * logits).sum(-1)


def token_logprobs(
    hidden_or_logits: Tensor,
    labels: Tensor,
    lm_head: Optional[Head] = None,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    tile_tokens: int = DEFAULT_TILE_TOKENS,
) -> tuple[Tensor, Tensor]:
    """Per-token ``log p(label)`` of this rank's shard, and the per-token entropy when ``entropy`` (else zeros):
    ``[b, s]`` fp32 each; the log-prob is 0 where the label is -100, the entropy is computed for every token. With
    ``lm_head`` the input is hidden states and only one ``[tile_tokens, V]`` tile of logits exists at a time
    (recomputed in backward); without ``entropy`` only tokens with a label go through the head."""
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be >= 1, got {tile_tokens}.")
    b, s = labels.shape
    x = hidden_or_logits.reshape(b * s, -1)  # [b*s, H or V]
    flat = labels.reshape(b * s).to(x.device)
    keep = None if entropy else labelled_index(flat)  # prompts and padding: log-prob 0 whatever their logits
    if keep is not None:
        x, flat = x.index_select(0, keep), flat.index_select(0, keep)  # [k, H or V]
    if not entropy and _plain_linear(lm_head):
        logp = -_through_head_once(lm_head, x, flat, tile_tokens, 1.0 / temperature)
        if keep is not None:
            logp = logp.new_zeros(b * s).index_copy(0, keep, logp)
        return logp.reshape(b, s), torch.zeros(b, s, device=logp.device)
    parts, ents = [], []
    tiles = head_tiles(flat.numel(), tile_tokens, lm_head, device=x.device)
    recompute = len(tiles) > 1 and torch.is_grad_enabled() and x.requires_grad  # alike on every rank (ZeRO-3 gathers)
    for start, end in tiles:
        args = (lm_head, x[start:end], flat[start:end], temperature, entropy)
        if recompute:
            logp, ent = checkpoint(_tile, *args, use_reentrant=False)  # keeps the tile's input, not its logits
        else:
            logp, ent = _tile(*args)
        parts.append(logp)
        ents.append(ent)
    logp = torch.cat(parts)
    if keep is not None:
        logp = logp.new_zeros(b * s).index_copy(0, keep, logp)
    ent = torch.cat(ents) if entropy else torch.zeros(b * s, device=logp.device)
    return logp.reshape(b, s), ent.reshape(b, s)


def sequence_logprobs(
    hidden_or_logits: Tensor,
    labels: Tensor,
    lm_head: Optional[Head] = None,
    *,
    group: Optional[dist.ProcessGroup] = None,
    segment_ids: Optional[Tensor] = None,
    num_segments: Optional[int] = None,
    temperature: float = 1.0,
    tile_tokens: int = DEFAULT_TILE_TOKENS,
) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of next-token log-probs and their token counts, over the whole sequences of the SP ``group``.

    Returns ``(logps, counts)``, ``[b, n]`` each (fp32; ``n`` = ``num_segments``, or the segments found, or 1): the
    sum of ``log p`` over the valid labels of each row's ``n``-th packed sample, summed over the SP group (value on
    every rank), differentiable with respect to this rank's tokens only (see the module docstring). Every rank of the
    group must pass the same ``num_segments`` (the strategy's step context knows it from the full batch).
    """
    logp, _ = token_logprobs(hidden_or_logits, labels, lm_head, temperature=temperature, tile_tokens=tile_tokens)
    valid = (labels != IGNORE_INDEX).to(logp.device)
    b = labels.shape[0]
    seg = torch.zeros_like(labels, device=logp.device) if segment_ids is None else segment_ids.to(logp.device).long()
    n = num_segments if num_segments is not None else int(seg.max()) + 1 if seg.numel() else 1
    local = torch.zeros(b, n, dtype=torch.float32, device=logp.device).scatter_add(1, seg, logp)  # [b, n]
    counts = torch.zeros(b, n, dtype=torch.float32, device=logp.device).scatter_add(1, seg, valid.float())
    return sp_sum(local, group), sp_sum(counts.detach(), group)


def sp_sum(local: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """``local`` summed over ``group``: the value of the sum, the gradient of ``local`` alone (no collective in
    backward; each rank's gradient covers its own tokens, SP ranks' gradients are added by the optimizer's reduction)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return local + (total - local.detach())


__all__ = ["DEFAULT_TILE_TOKENS", "head_tiles", "sequence_logprobs", "sp_sum", "token_logprobs"]
