"""Token-level distillation losses with TRL's definitions (GKD's ``generalized_jsd_loss``), computed in token tiles
through both models' lm_heads, so neither ``[S, V]`` distribution is ever whole.

With ``p_t = softmax(teacher / T)``, ``p_s = softmax(student / T)`` per token:

* ``"forward_kl"``: ``KL(p_t || p_s)`` (TRL GKD ``beta=0``);
* ``"reverse_kl"``: ``KL(p_s || p_t)`` (``beta=1``);
* ``"jsd"``: ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with ``m = beta p_t + (1 - beta) p_s``.

Summed over the vocabulary; the caller averages over the tokens that carry a label (the SP token mean of
:func:`lightning_ulysses.parallel.loss.normalize_sp_loss`). The student's next-token cross-entropy of the same tiles
comes with it, for a loss mixed with CE.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_ulysses.parallel.logprobs import head_tiles
from lightning_ulysses.parallel.sharding import IGNORE_INDEX, labelled_index

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, divergence: str, beta: float = 0.5,
                     temperature: float = 1.0) -> Tensor:
    """``[t, V]`` logits of both -> ``[t]`` divergence per token (fp32)."""
    s = torch.log_softmax(student_logits.float() / temperature, -1)
    t = torch.log_softmax(teacher_logits.float() / temperature, -1)
    if divergence == "forward_kl":
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta} (0 is forward_kl, 1 is reverse_kl).")
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    return (beta * F.kl_div(m, t, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True)).sum(-1)


def _tile(student_head: Callable, teacher_head: Callable, s_h: Tensor, t_h: Tensor, labels: Tensor, divergence: str,
          beta: float, temperature: float) -> tuple[Tensor, Tensor]:
    student = student_head(s_h)  # [t, V]
    with torch.no_grad():
        teacher = teacher_head(t_h)  # [t, V]
    valid = labels != IGNORE_INDEX
    div = token_divergence(student, teacher, divergence, beta, temperature) * valid  # [t]
    ce = F.cross_entropy(student.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")  # [t]
    return div.sum(), ce.sum()


def tiled_distillation_sums(student_hidden: Tensor, teacher_hidden: Tensor, labels: Tensor, student_head: Callable,
                            teacher_head: Callable, *, divergence: str = "forward_kl", beta: float = 0.5,
                            temperature: float = 1.0, tile_tokens: int = 2048) -> tuple[Tensor, Tensor]:
    """Sums over this rank's labelled tokens of the divergence and of the student's cross-entropy: two fp32 scalars.
    ``*_hidden [b, s, H]`` (the teacher's detached), ``labels [b, s]`` (shifted). Only labelled tokens go through the
    heads; each tile's logits are recomputed in backward, so at most one ``[tile_tokens, V]`` pair of them exists."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {divergence!r}.")
    n = labels.numel()
    s_h, t_h = student_hidden.reshape(n, -1), teacher_hidden.detach().reshape(n, -1)
    flat = labels.reshape(n).to(s_h.device)
    keep = labelled_index(flat)
    if keep is not None:  # tokens without a label add nothing to either sum: they skip both heads
        s_h, t_h, flat = s_h.index_select(0, keep), t_h.index_select(0, keep), flat.index_select(0, keep)
        n = keep.numel()
    div = torch.zeros((), device=s_h.device)
    ce = torch.zeros((), device=s_h.device)
    tiles = head_tiles(n, tile_tokens, student_head, teacher_head, device=s_h.device)  # as many on every rank
    recompute = len(tiles) > 1 and torch.is_grad_enabled() and s_h.requires_grad
    for start, end in tiles:
        args = (student_head, teacher_head, s_h[start:end], t_h[start:end], flat[start:end], divergence, beta,
                temperature)
        d, c = checkpoint(_tile, *args, use_reentrant=False) if recompute else _tile(*args)
        div, ce = div + d, ce + c
    return div, ce


__all__ = ["DIVERGENCES", "tiled_distillation_sums", "token_divergence"]
