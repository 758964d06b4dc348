"""Attention within the segments of a packed sequence, one kernel call per distinct segment *length*.

Vision towers that attend within windows or frames (Qwen2-VL, Qwen2.5-VL) pack a tile's patches into one sequence
and describe the segments by ``cu_seqlens``. Under ``sdpa`` / ``eager`` transformers splits the sequence and calls
the kernel once per segment: a Qwen2.5-VL-7B tower on one tile of 16,384 patches makes 256 calls per windowed block
(8 x 8-patch windows) and 16 per full-attention block (one per 2-frame group), ~7,000 small calls per tile, so the
tower runs far below the GPU's speed. Windows and frames mostly share one size: segments of equal length are
gathered into one batch ``[n, H, L, d]`` and attended in one call, which computes exactly what the per-segment calls
compute (each batch row is one segment; no mask, no padding).

Shapes: ``query`` / ``key`` / ``value`` ``[1, H, T, d]`` (the towers' layout), ``cu_seqlens [n + 1]`` (0 ... T);
returns ``[1, T, H, d]`` like transformers' attention functions.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _by_length(bounds: list[int]) -> dict[int, list[int]]:
    """Segment starts grouped by segment length, in order (empty segments dropped)."""
    groups: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            groups.setdefault(end - start, []).append(start)
    return groups


def segment_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor] = None, scaling: Optional[float] = None, dropout: float = 0.0,
                      cu_seq_lens_q: Optional[Tensor] = None, cu_seq_lens_k: Optional[Tensor] = None,
                      is_causal: bool = False, **kwargs: Any) -> tuple[Tensor, None]:
    """Full (or causal) attention of each segment of ``cu_seq_lens_q`` with itself, batched by segment length; the
    whole sequence as one segment when no boundaries are given. The signature is transformers' attention interface
    (``attention_interface(module, q, k, v, attention_mask, scaling=..., dropout=..., cu_seq_lens_q=..., ...)``)."""
    if attention_mask is not None:
        raise ValueError("segment_attention takes segment boundaries (cu_seq_lens_q), not an attention mask.")
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"segment_attention expects [1, heads, tokens, head_dim] inputs, got {tuple(query.shape)}.")
    total = query.shape[2]
    bounds = [0, total] if cu_seq_lens_q is None else [int(b) for b in cu_seq_lens_q.tolist()]  # one host sync
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k.cpu(),
                                                                                             cu_seq_lens_q.cpu()):
        raise ValueError("segment_attention attends each segment with itself: cu_seq_lens_k must equal cu_seq_lens_q.")
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seq_lens_q must run from 0 to the {total} tokens, got {bounds[0]} ... {bounds[-1]}.")
    heads, kv_heads = query.shape[1], key.shape[1]
    gqa = {"enable_gqa": True} if kv_heads != heads else {}
    p = dropout if module is None or module.training else 0.0

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [n, H, L, d] each
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=is_causal, scale=scaling, **gqa)

    groups = _by_length(bounds)
    if len(groups) == 1:
        (length, starts), = groups.items()
        n = len(starts)
        # one length, segments back to back: a view [H, n, L, d] -> [n, H, L, d], no gather
        batch = [t[0].reshape(t.shape[1], n, length, t.shape[-1]).transpose(0, 1) for t in (query, key, value)]
        out = attend(*batch)  # [n, H, L, d]
        return out.transpose(1, 2).reshape(1, total, heads, out.shape[-1]), None
    pieces, order = [], []
    for length, starts in groups.items():
        index = (torch.tensor(starts, device=query.device)[:, None]
                 + torch.arange(length, device=query.device)[None, :]).reshape(-1)
        n = len(starts)
        batch = [t[0].index_select(1, index).reshape(t.shape[1], n, length, t.shape[-1]).transpose(0, 1)
                 for t in (query, key, value)]
        out = attend(*batch)  # [n, H, L, d]
        pieces.append(out.transpose(1, 2).reshape(n * length, heads, out.shape[-1]))
        order.append(index)
    grouped = torch.cat(pieces)  # [T, H, d] in the groups' token order
    inverse = torch.empty_like(torch.cat(order))
    inverse[torch.cat(order)] = torch.arange(total, device=query.device)
    return grouped.index_select(0, inverse).unsqueeze(0), None


__all__ = ["segment_attention"]
