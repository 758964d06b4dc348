"""Tiled attention backward: causal attention whose backward runs on query x key tiles; packed rows one
segment at a time.

Why: at long sequences the largest single allocation of a training step is the attention kernel's
backward *workspace*, not an activation. Measured on H200 for 32 query / 8 kv heads (one
``[tokens, hidden]`` bf16 tensor = 1 unit): cuDNN's SDPA backward allocates 4.0 units beyond its
outputs (fp32 dQ accumulator + dK/dV expanded to the query heads), flash 6.0. That is 32 KiB per
token for Llama-3-8B's width, at the moment every other activation of the layer is also live.

How: forward is the ordinary whole-sequence kernel (fast, little workspace) and saves its output
and log-sum-exp. Backward walks query tiles ``i`` and, for each, key tiles ``j <= i`` (the diagonal
tile causal, the others full), calling the kernel's backward with the *global* output and
log-sum-exp (:mod:`lightning_ulysses.kernels.attention` explains why that is exact). Live beyond the
gradients themselves: one query tile's fp32 dQ accumulator and dK/dV in fp32 with the *kv* head
count (``4 / groups`` units; 1 unit for 4:1 GQA), plus one tile call's workspace. For MHA (one query
head per kv head) key tiles go outer instead and dQ is the whole-sequence fp32 sum (2 units, as in
the kernel). The kernels run the same FLOPs as the untiled backward (each tile recomputes its row
statistic ``rowsum(dO * O)``, a ``[tile, d]`` reduction); the workspace and time they cost are in
docs/benchmarks.md (2026-11-22, "tiled attention backward, later offload prefetch").

Rounding: the kernel rounds each tile's dQ/dK/dV to the input dtype before we sum them in fp32, so a
bf16 gradient carries an extra rounding per key tile (``benchmarks/tiled_attention_check.py`` bounds it against
an fp32 reference; the output is the kernel's own). Sequences shorter than ``MIN_TILES`` tiles
run the untiled backward (exactly the kernel).

Used as a local kernel behind transformers' ``sdpa`` attention interface (with or without Ulysses;
under Ulysses it runs on the gathered sequence of the local heads). Calls it cannot serve exactly
(an attention mask: packing or sliding windows; dropout; softcapping; sinks; no gradient) go to the
original kernel unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from lightning_ulysses.compat.torch import no_dispatch_modes
from lightning_ulysses.kernels.attention import AttentionKernel, expand_kv, reduce_kv, select_kernel

DEFAULT_TILE_TOKENS = 16384
# Below 4 tiles the per-tile buffers (q/out/dout copies, fp32 dQ, one kernel call's workspace: ~10
# units x tile / S) cost more than the kernel's own 4-unit workspace (measured on H200: 2 tiles 7.0
# units, 4 tiles 3.6): shorter sequences use the untiled backward.
MIN_TILES = 4


_PROBED_KERNELS = ("cudnn", "flash")


@functools.lru_cache(maxsize=None)
def _native_gqa(kernel_name: str, device: str, dtype: torch.dtype) -> bool:
    """Whether ``kernel_name`` takes fewer kv heads than query heads as is (probed once per device/dtype).

    Saves expanding K/V to the query heads for the whole-sequence forward; tiles are expanded anyway
    when it does not.
    """
    if kernel_name not in _PROBED_KERNELS:
        return False
    # The first call can come from inside a selectively checkpointed forward: its dispatch mode would
    # record the probe's kernel outputs, and the recompute (which does not probe) would be handed them.
    with no_dispatch_modes(), torch.no_grad():
        return _probe(select_kernel(torch.device(device), dtype, kernel_name), device, dtype)


def _probe(kernel: AttentionKernel, device: str, dtype: torch.dtype) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 4, 64, 64, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, 2, 64, 64, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, 2, 64, 64, device=device, dtype=dtype, generator=gen)
    try:
        out, lse, aux = kernel.forward(q, k, v, True, 0.125)
        dq, dk, dv = kernel.backward(torch.ones_like(out), q, k, v, out, lse, aux, True, 0.125)
    except RuntimeError:
        return False
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    return dk.shape == k.shape and bool(torch.allclose(out.float(), ref.float(), atol=2e-2))


class _TiledBackwardAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, tile: int, kernel: AttentionKernel, native: bool):
        groups = q.shape[1] // k.shape[1]
        kf, vf = (k, v) if native else (expand_kv(k, groups), expand_kv(v, groups))
        out, lse, aux = kernel.forward(q, kf, vf, True, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.tile, ctx.kernel, ctx.native, ctx.aux = scale, tile, kernel, native, aux
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        kernel, scale, tile, native = ctx.kernel, ctx.scale, ctx.tile, ctx.native
        b, h, s, d = q.shape
        groups = h // k.shape[1]
        if s < MIN_TILES * tile:  # the kernel's own backward, nothing copied or accumulated
            kf, vf = (k, v) if native else (expand_kv(k, groups), expand_kv(v, groups))
            dq, dk, dv = kernel.backward(dout.contiguous(), q, kf, vf, out, lse, ctx.aux, True, scale)
            if not native:
                dk, dv = reduce_kv(dk, groups), reduce_kv(dv, groups)
            return dq, dk, dv, None, None, None, None
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 sums (fp64 for fp64 inputs)
        bounds = [(i, min(s, i + tile)) for i in range(0, s, tile)]

        def block(r: tuple[int, int], c: tuple[int, int], rows: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
            """Exact gradient contributions of query tile ``r`` x key tile ``c`` (dK/dV in kv heads, ``acc``)."""
            kj, vj = k[:, :, c[0] : c[1]], v[:, :, c[0] : c[1]]
            if not native:
                kj, vj = expand_kv(kj, groups), expand_kv(vj, groups)
            aux = kernel.block_aux(ctx.aux, r[1] - r[0], c[1] - c[0])
            qi, oi, doi, li = rows
            dqb, dkb, dvb = kernel.backward(doi, qi, kj.contiguous(), vj.contiguous(), oi, li, aux, c[0] == r[0], scale)
            return dqb, reduce_kv(dkb.to(acc), 1 if native else groups), reduce_kv(dvb.to(acc), 1 if native else groups)

        def query_tile(r: tuple[int, int]) -> tuple[Tensor, ...]:
            # dout arrives as a transposed view of [b, S, h, d]: copy per tile, never whole
            return tuple(t[:, :, r[0] : r[1]].contiguous() for t in (q, out, dout, lse))

        if groups > 1:
            # query tiles outer: dQ is summed per tile, dK/dV whole in fp32 with the *kv* head count
            # (4 / groups units: below the kernel's workspace for GQA)
            dq = torch.empty_like(q)
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
            for i, r in enumerate(bounds):
                rows = query_tile(r)
                dqi: Optional[Tensor] = None
                for c in bounds[: i + 1]:
                    dqb, dkb, dvb = block(r, c, rows)
                    dqi = dqb.to(acc) if dqi is None else dqi.add_(dqb)
                    dk[:, :, c[0] : c[1]] += dkb
                    dv[:, :, c[0] : c[1]] += dvb
                dq[:, :, r[0] : r[1]] = dqi
            return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None
        # MHA: key tiles outer, dQ whole in fp32 (2 units, what the kernel itself keeps), dK/dV per tile
        dq32 = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        for j, c in enumerate(bounds):
            dkj = dvj = None
            for r in bounds[j:]:
                dqb, dkb, dvb = block(r, c, query_tile(r))
                dq32[:, :, r[0] : r[1]] += dqb
                dkj, dvj = (dkb, dvb) if dkj is None else (dkj.add_(dkb), dvj.add_(dvb))
            dk[:, :, c[0] : c[1]], dv[:, :, c[0] : c[1]] = dkj, dvj
        return dq32.to(q.dtype), dk, dv, None, None, None, None


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Optional[float] = None,
    tile_tokens: int = DEFAULT_TILE_TOKENS,
    backend: str = "auto",
) -> Tensor:
    """Causal attention of ``q``/``k``/``v`` (``[b, h, s, d]``; kv heads may be fewer and must divide the
    query heads) with a tiled backward. Same result as ``F.scaled_dot_product_attention(...,
    is_causal=True, enable_gqa=True)``; the backward's workspace is bounded by ``tile_tokens``.
    """
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}).")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"tiled attention needs as many keys as queries (self-attention), got {k.shape[2]} vs {q.shape[2]}.")
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be positive, got {tile_tokens}.")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kernel = select_kernel(q.device, q.dtype, backend)
    native = q.shape[1] == k.shape[1] or _native_gqa(kernel.name, str(q.device), q.dtype)
    return _TiledBackwardAttention.apply(q, k, v, scale, tile_tokens, kernel, native)


def segment_bounds(segments: Tensor) -> list[list[tuple[int, int]]]:
    """``[b, S]`` segment ids (:func:`lightning_ulysses.parallel.sharding.packed_segments`) -> per row the
    ``(start, end)`` of each segment. One device-to-host copy of a ``[b, S]`` bool tensor."""
    s = segments.shape[1]
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    rows = []
    for row in starts.cpu():
        first = row.nonzero().flatten().tolist()
        rows.append(list(zip(first, first[1:] + [s])))
    return rows


# Segments shorter than this are attended in groups of consecutive segments up to this many tokens, one masked kernel
# call per group with the group's block-diagonal causal mask (CHUNK^2 bytes): a row of thousands of short SFT samples
# then costs tens of kernel calls, not thousands, while a long segment still gets its own (unmasked) call.
PACKED_CHUNK_TOKENS = 2048


def _chunks(segments: list[tuple[int, int]], chunk_tokens: int) -> list[list[tuple[int, int]]]:
    """Consecutive segments grouped: a segment of ``chunk_tokens`` or more alone, shorter ones together up to
    ``chunk_tokens`` tokens per group."""
    groups: list[list[tuple[int, int]]] = []
    for a, b in segments:
        short = b - a < chunk_tokens
        if short and groups and groups[-1][-1][1] - groups[-1][0][0] + (b - a) <= chunk_tokens \
                and groups[-1][0][1] - groups[-1][0][0] < chunk_tokens:
            groups[-1].append((a, b))
        else:
            groups.append([(a, b)])
    return groups


def _block_diagonal_causal(group: list[tuple[int, int]], device: torch.device) -> Tensor:
    start, end = group[0][0], group[-1][1]
    ids = torch.repeat_interleave(torch.arange(len(group), device=device),
                                  torch.tensor([b - a for a, b in group], device=device))
    idx = torch.arange(end - start, device=device)
    return (ids[:, None] == ids[None, :]) & (idx[None, :] <= idx[:, None])  # [L, L], True = attend


def packed_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bounds: list[list[tuple[int, int]]],
    scale: Optional[float] = None,
    tile_tokens: Optional[int] = None,
    backend: str = "auto",
    chunk_tokens: int = PACKED_CHUNK_TOKENS,
) -> Tensor:
    """Causal attention inside each packed segment of each row (``[b, h, S, d]``; ``bounds`` from
    :func:`segment_bounds`): the same result as SDPA with the row's block-diagonal causal mask, without
    materialising that ``[S, S]`` mask (S^2 bytes per row: 64 GiB at 256K tokens). A segment of ``chunk_tokens`` or
    more gets one unmasked kernel call (``tile_tokens`` tiles its backward); shorter consecutive segments share one
    call with their small block-diagonal mask (:data:`PACKED_CHUNK_TOKENS`).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    groups_kv = q.shape[1] // k.shape[1]
    rows = []
    for i, segments in enumerate(bounds):
        parts = []
        for group in _chunks(segments, chunk_tokens):
            a, b = group[0][0], group[-1][1]
            qs, ks, vs = (t[i : i + 1, :, a:b].contiguous() for t in (q, k, v))
            if len(group) == 1:
                parts.append(tiled_attention(qs, ks, vs, scale, tile_tokens or max(1, b - a), backend))
            else:  # masked kernels take K/V at the query head count
                mask = _block_diagonal_causal(group, q.device)
                parts.append(torch.nn.functional.scaled_dot_product_attention(
                    qs, expand_kv(ks, groups_kv), expand_kv(vs, groups_kv), attn_mask=mask, scale=scale))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


__all__ = ["DEFAULT_TILE_TOKENS", "MIN_TILES", "PACKED_CHUNK_TOKENS", "packed_causal_attention", "segment_bounds", "tiled_attention"]
