"""Ulysses attention for Hugging Face models: sequence-sharded -> head-sharded -> sequence-sharded.

Every rank of an SP group of size ``sp`` holds ``c = S / sp`` consecutive tokens of each sequence.
Attention needs the whole sequence, so before the core kernel one all-to-all trades sequence for
heads (each rank then holds all ``S`` tokens of ``h / sp`` heads), and one after trades them back.
Everything else in the model (norms, MLP, projections, loss) is token-local and runs on the shard.

It hooks into transformers through :mod:`lightning_ulysses.kernels.dispatch` (the attention-interface
wrapper), scoped to the model it is applied to: any other model in the process is untouched.

Unlike DeepSpeed's ``UlyssesSPAttentionHF``, batch size and sequence length are read from the
tensors at every call (nothing is fixed at registration), and causality is re-derived from the
*global* position ids, so packed sequences (position ids restarting at 0) stay correct; with ``sdpa``
a packed row runs one kernel call per segment (:func:`lightning_ulysses.kernels.tiled.packed_causal_attention`)
instead of a dense ``[S, S]`` mask, which would take S^2 bytes per row (64 GiB at 256K tokens). The global
positions and the packed segments come from the batch's step context (:mod:`lightning_ulysses.parallel.step_context`,
built once where the strategy shards the batch); only a model driven without the strategy gathers them, once
per forward.

With a ring dimension (``sp = ulysses x ring``) the all-to-all runs over the Ulysses group only and
gathers one ring *segment*; :func:`lightning_ulysses.parallel.ring.ring_attention` then attends across the
ring group instead of the HF kernel (ulysses == 1: no all-to-all at all).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_ulysses.compat.torch import all_to_all_autograd
from lightning_ulysses.compat.transformers import attn_implementation, kv_groups
from lightning_ulysses.kernels.dispatch import own_masks, plain_causal, set_sp_attention, sp_attention_of
from lightning_ulysses.kernels.tiled import packed_causal_attention, segment_bounds
from lightning_ulysses.parallel.layout import SUPPORTED_ATTN_IMPLEMENTATIONS, ProcessGroups, heads_allow
from lightning_ulysses.parallel.ring import RingGroup, ring_attention
from lightning_ulysses.parallel.sharding import packed_segments
from lightning_ulysses.parallel.step_context import current_step_context

_HOOKS_ATTR = "_lightning_ulysses_hooks"
_MASK_HOOKS_ATTR = "_lightning_ulysses_mask_hooks"


def all_to_all(x: Tensor, group: dist.ProcessGroup, comm_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Differentiable all-to-all over dim 0 (``x.shape[0] == group size``): slot ``j`` goes to rank ``j``.

    Its backward is the same exchange. ``comm_dtype`` optionally casts for the wire (e.g. fp32 activations
    sent as bf16).
    """
    orig_dtype = x.dtype
    if comm_dtype is not None and comm_dtype != orig_dtype:
        x = x.to(comm_dtype)
    out = all_to_all_autograd(x.contiguous(), group)
    return out.to(orig_dtype) if out.dtype != orig_dtype else out


def seq_to_heads(tensors: list[Tensor], sp: int, group: dist.ProcessGroup, comm_dtype=None) -> list[Tensor]:
    """``[b, h_i, c, d]`` sequence shards -> ``[b, h_i/sp, S, d]`` head shards, one collective for all.

    Fusing q, k and v into one all-to-all pays the collective's latency once per layer instead of three
    times (it dominates at short shards and on slower links).
    """
    b, _, c, d = tensors[0].shape
    heads = [t.shape[1] for t in tensors]
    # [b, h, c, d] -> [sp, b, h/sp, c, d]: slot j holds the head group that rank j will own.
    parts = [t.reshape(b, sp, h // sp, c, d).transpose(0, 1) for t, h in zip(tensors, heads)]
    packed = torch.cat(parts, dim=2)  # [sp, b, sum(h)/sp, c, d]
    packed = all_to_all(packed, group, comm_dtype)  # slot j now holds sequence chunk j of my heads
    outs = []
    for part in packed.split([h // sp for h in heads], dim=2):
        # [sp, b, h/sp, c, d] -> [b, h/sp, sp, c, d] -> [b, h/sp, S, d]; chunk order == sequence order
        outs.append(part.permute(1, 2, 0, 3, 4).reshape(b, part.shape[2], sp * c, d))
    return outs


def heads_to_seq(out: Tensor, sp: int, group: dist.ProcessGroup, comm_dtype=None) -> Tensor:
    """HF kernel output ``[b, S, h/sp, d]`` -> ``[b, c, h, d]`` (my sequence chunk, all heads)."""
    b, s, hl, d = out.shape
    c = s // sp
    # [b, S, hl, d] -> [sp, b, c, hl, d]: slot j is sequence chunk j, which goes back to rank j.
    send = out.reshape(b, sp, c, hl, d).transpose(0, 1)
    recv = all_to_all(send, group, comm_dtype)  # slot j: head group j of my chunk
    # [sp, b, c, hl, d] -> [b, c, sp, hl, d] -> [b, c, h, d]; head group order == head order
    return recv.permute(1, 2, 0, 3, 4).reshape(b, c, sp * hl, d)


def causal_mask(
    position_ids: Tensor, segments: Optional[Tensor], sliding_window: Optional[int]
) -> Tensor:
    """Boolean ``[b, 1, S, S]`` mask (True = attend) for sdpa when plain ``is_causal`` is not enough."""
    s = position_ids.shape[1]
    idx = torch.arange(s, device=position_ids.device)
    mask = (idx[None, :] <= idx[:, None])[None, None]  # [1, 1, S, S] causal
    if segments is not None:
        mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
    if sliding_window is not None:
        mask = mask & ((idx[:, None] - idx[None, :]) < sliding_window)[None, None]
    return mask.expand(position_ids.shape[0], 1, s, s)


class UlyssesAttention:
    """One model's sequence-parallel attention: the Ulysses / ring groups, and the attention path chosen once when
    it is applied (ring, ``sdpa`` with packed rows per segment, or a flash kernel) instead of on every call.

    Attributes: ``ulysses`` is the all-to-all degree (``sp = ulysses x ring``); ``calls`` counts attention calls
    of the current forward (a forward with none means the model bypassed transformers' attention interface).
    """

    def __init__(
        self,
        groups: ProcessGroups,
        comm_dtype: Optional[torch.dtype] = None,
        ring_zigzag: bool = True,
        ring_backend: str = "auto",
        attn_implementation: str = "sdpa",
    ) -> None:
        if groups.sp_group is None and groups.sp > 1:
            raise ValueError("UlyssesAttention needs an SP group when sequence_parallel_size > 1.")
        self.sp = groups.sp
        self.sp_group = groups.sp_group  # every rank of the sequence: what the loss reduces over
        self.group = groups.ulysses_group  # the all-to-all group; None when ulysses == 1 (ring only)
        self.ulysses = groups.ulysses
        self.ring_group = groups.ring_group
        self.ring_zigzag = ring_zigzag
        self.ring_backend = ring_backend
        self._ring_peers: Optional[RingGroup] = None  # neighbours, resolved once (attention calls are hot)
        self.comm_dtype = comm_dtype
        self.calls = 0
        self._gathered = _GatheredPositions(self.group, self.ulysses)
        self._varlen_cache: Optional[tuple] = None  # flash kernels: (key, cu_seqlens, longest sample)
        if self.ring_group is not None:
            self._attend: Callable = self._attend_ring
        elif attn_implementation == "sdpa":
            self._attend = self._attend_sdpa
        elif attn_implementation == "eager":
            self._attend = self._attend_eager
        else:  # flash kernels take causality from the kwargs, packed samples as varlen cu_seqlens
            self._attend = self._attend_flash

    def __call__(
        self,
        core: Callable,
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        self.calls += 1
        u = self.ulysses
        hq, hkv = query.shape[1], key.shape[1]
        if not heads_allow(u, hq, hkv):
            raise ValueError(
                f"Ulysses sp={u} cannot split this layer's heads (q={hq}, kv={hkv}); choose a "
                "sequence_parallel_size that divides the query heads and divides or is a multiple of the kv heads."
            )
        if kwargs.get("position_ids") is None:
            raise ValueError(
                "Ulysses attention needs position_ids in the model call: each shard only knows its own tokens, so "
                "causal masking is rebuilt from the global positions. Pass position_ids=batch['position_ids'] "
                "(the strategy's data sharding creates them) to the model's forward."
            )
        # GQA/MQA with fewer kv heads than ranks: replicate each kv head u/hkv times so every rank
        # receives exactly the kv head its query heads use (their group boundaries line up).
        if hkv < u:
            key = key.repeat_interleave(u // hkv, dim=1)
            value = value.repeat_interleave(u // hkv, dim=1)
        # [b, h, c, d] -> [b, h/u, S, d]
        q, k, v = seq_to_heads([query, key, value], u, self.group, self.comm_dtype) if self.group is not None else (query, key, value)
        out, weights = self._attend(core, module, q, k, v, args, kwargs)  # out: [b, S, h/u, d]
        return (heads_to_seq(out, u, self.group, self.comm_dtype) if self.group is not None else out), weights

    # ---- the attention paths (one is chosen in __init__); each returns ([b, S, h/u, d], weights)
    def _attend_ring(self, core: Callable, module: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, args: tuple,
                     kwargs: dict) -> tuple[Tensor, Any]:
        # packed rows: the sample ids of the whole sequence, from the step context (the batch before sharding)
        ctx = current_step_context()
        local = kwargs.get("position_ids")
        packed = ctx is not None and ctx.segments is not None and local is not None and ctx.positions_apply_to(
            local if local.dim() == 2 else local.unsqueeze(0))
        return self._ring(module, q, k, v, kwargs, ctx.segments if packed else None), None

    def _gathered_sequence(self, module: torch.nn.Module, q: Tensor, kwargs: dict
                           ) -> tuple[Tensor, Optional[Tensor], Callable[[], list], Optional[int]]:
        """What every local path needs of the gathered ``[b, S]`` sequence: its global positions (also put into
        ``kwargs``), packed segment ids, the segment-bounds thunk, and the layer's sliding window (None when it
        covers the whole sequence)."""
        positions, segments, bounds = self._positions(kwargs["position_ids"], q.shape[0])
        kwargs["position_ids"] = positions
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        return positions, segments, bounds, window if window is not None and window < q.shape[2] else None

    def _attend_sdpa(self, core: Callable, module: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, args: tuple,
                     kwargs: dict) -> tuple[Tensor, Any]:
        positions, segments, bounds, window = self._gathered_sequence(module, q, kwargs)
        if segments is not None and window is None and plain_causal(module, kwargs):
            # packed rows: one kernel call per segment instead of an [S, S] mask (S^2 bytes per row)
            return self._packed(module, q, k, v, kwargs, bounds()), None
        # HF built a mask for the *local* shard; it is meaningless for the gathered sequence.
        mask = causal_mask(positions, segments, window) if (segments is not None or window) else None
        return self._core(core, module, q, k, v, mask, args, kwargs)

    def _attend_eager(self, core: Callable, module: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, args: tuple,
                      kwargs: dict) -> tuple[Tensor, Any]:
        # eager takes no is_causal: it always gets the gathered sequence's mask (causal, inside each packed sample,
        # within the sliding window), additive in the activations' dtype as transformers' own eager masks are
        positions, segments, _, window = self._gathered_sequence(module, q, kwargs)
        allowed = causal_mask(positions, segments, window)
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, torch.finfo(q.dtype).min)
        return self._core(core, module, q, k, v, mask, args, kwargs)

    def _attend_flash(self, core: Callable, module: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, args: tuple,
                      kwargs: dict) -> tuple[Tensor, Any]:
        _, segments, bounds, _ = self._gathered_sequence(module, q, kwargs)  # the window goes to the kernel as is
        if segments is not None:
            # transformers derives packed samples from position ids only for a one-row batch (a [b > 1, S] packed
            # batch would run the dense kernel across samples), and again in every layer with a host sync: hand its
            # varlen kernel every row's samples at once, the [b, S] tokens flattened, cu_seqlens built once a step
            cu, longest = self._varlen(bounds(), q.shape[0], q.shape[2], q.device)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return self._core(core, module, q, k, v, None, args, kwargs)

    def _varlen(self, bounds: list, batch: int, seq: int, device: torch.device) -> tuple[Tensor, int]:
        """int32 ``cu_seqlens`` over the ``[batch * seq]`` flattened tokens (sample ``i`` at ``cu[i]:cu[i + 1]``)
        and the longest sample, for the segment bounds of a step (cached on their identity: every layer, and
        the recompute of checkpointed ones, gets the same list)."""
        key = (bounds, batch, seq, device)
        cached = self._varlen_cache
        if cached is None or cached[0][0] is not bounds or cached[0][1:] != key[1:]:
            rows = bounds if len(bounds) == batch else bounds * batch
            ends = [r * seq + end for r, row in enumerate(rows) for _, end in row]
            longest = max(end - start for row in rows for start, end in row)
            cu = torch.tensor([0] + ends, dtype=torch.int32, device=device)
            self._varlen_cache = cached = (key, cu, longest)
        return cached[1], cached[2]

    def _core(self, core: Callable, module: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
              args: tuple, kwargs: dict) -> tuple[Tensor, Any]:
        with kv_groups(module, q.shape[1] // k.shape[1]):  # the local query/kv head ratio
            return core(module, q, k, v, mask, *args, **kwargs)

    def _positions(self, local: Tensor, batch: int) -> tuple[Tensor, Optional[Tensor], Callable[[], list]]:
        """Global ``[b, S]`` positions, packed segment ids (or None) and a thunk for the segment bounds: from the
        batch's step context when it was built for these positions, else gathered here (once per forward)."""
        if local.dim() == 1:
            local = local.unsqueeze(0)
        ctx = current_step_context()
        if ctx is not None and ctx.global_positions is not None and ctx.positions_apply_to(local):
            positions, segments, bounds = ctx.global_positions, ctx.segments, lambda: ctx.segment_bounds
        else:
            positions, segments, bounds = self._gathered(local)
        if positions.shape[0] == 1 and batch > 1:
            positions = positions.expand(batch, -1)
            segments = segments.expand(batch, -1) if segments is not None else None
        return positions, segments, bounds

    def _packed(self, module: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, kwargs: dict, bounds: list) -> Tensor:
        from lightning_ulysses.kernels.dispatch import local_attention_of

        bounds = bounds if len(bounds) == q.shape[0] else bounds * q.shape[0]
        local = local_attention_of(module)  # the tiled backward, if enabled, tiles long segments
        out = packed_causal_attention(
            q, k, v, bounds, scale=kwargs.get("scaling"), tile_tokens=getattr(local, "tile_tokens", None),
            backend=getattr(local, "backend", "auto"),
        )
        return out.transpose(1, 2)  # [b, S, h/u, d], as HF kernels return

    def _ring(self, module: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, kwargs: dict,
              segments: Optional[Tensor] = None) -> Tensor:
        """Ring attention over the gathered segment; refuses what its causal-only kernels cannot do."""
        unsupported = []
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        if window is not None:
            unsupported.append(f"sliding_window={window}")
        if kwargs.get("dropout", 0.0):
            unsupported.append(f"attention dropout={kwargs['dropout']}")
        if kwargs.get("softcap") is not None:
            unsupported.append("logit softcapping")
        if kwargs.get("s_aux") is not None:
            unsupported.append("attention sinks")
        if unsupported:
            raise ValueError(
                f"Ring attention (ring size > 1) supports plain causal attention only; this model uses "
                f"{', '.join(unsupported)}. Use context_parallel_mode='ulysses_only' with a sequence_parallel_size "
                "the heads allow, or set attention_dropout=0 for training."
            )
        if self._ring_peers is None:
            self._ring_peers = RingGroup.of(self.ring_group)
        if segments is not None and segments.shape[0] != q.shape[0]:
            segments = segments.expand(q.shape[0], -1)
        out = ring_attention(
            q, k, v, self._ring_peers, scale=kwargs.get("scaling"), zigzag=self.ring_zigzag, backend=self.ring_backend,
            segments=segments,
        )
        return out.transpose(1, 2)


class _GatheredPositions:
    """Global positions for a model driven without the strategy (no step context): one all-gather over the Ulysses
    group per forward. Every layer of that forward (and the recompute of checkpointed layers) receives the same
    ``position_ids`` tensor object, so it is cached on identity; the cache decision depends only on program
    order, which is the same on every rank, so the collective stays matched."""

    def __init__(self, group: Optional[dist.ProcessGroup], ulysses: int) -> None:
        self.group, self.ulysses = group, ulysses
        self._local: Optional[Tensor] = None
        self._value: Any = None

    def __call__(self, local: Tensor) -> tuple[Tensor, Optional[Tensor], Callable[[], list]]:
        if local is not self._local:
            # [b, c] x u -> [b, S]; rank order == sequence order (contiguous sharding)
            if self.ulysses > 1:
                parts = [torch.empty_like(local) for _ in range(self.ulysses)]
                dist.all_gather(parts, local.contiguous(), group=self.group)
                positions = torch.cat(parts, dim=1)
            else:
                positions = local
            segments = packed_segments(positions)
            cache: list = []

            def bounds() -> list:
                if not cache:
                    cache.append(segment_bounds(segments))
                return cache[0]

            self._local, self._value = local, (positions, segments, bounds)
        return self._value


def _check_routed(model: torch.nn.Module, args: Any, output: Any) -> None:
    ctx = ulysses_of(model)
    if ctx is None or ctx.calls > 0:
        return
    if ctx.sp == 1:
        # one rank per sequence: a model without attention layers (an SSM) has nothing for the handler to do,
        # unless its rows are packed -- then its recurrence runs across the samples of a row
        step = current_step_context()
        if step is not None and step.segments is not None:
            raise ValueError(
                f"The batch has packed rows (position_ids restarting within a row), but {type(model).__name__} has no "
                "attention layers to keep the samples apart: its layers mix tokens with a recurrence or convolution "
                "that runs across the whole row. Give it one sample per row (pack=False in the data modules)."
            )
        return
    raise RuntimeError(
        "The model ran a forward pass under sequence parallelism but none of its attention calls went through "
        "the Ulysses wrapper, so every rank attended only to its own shard. This model's attention does not use "
        "transformers' global ALL_ATTENTION_FUNCTIONS; it is not supported by lightning_ulysses yet."
    )


def _reset_calls(model: torch.nn.Module, args: Any) -> None:
    ctx = ulysses_of(model)
    if ctx is not None:
        ctx.calls = 0


def apply_ulysses(
    model: torch.nn.Module,
    groups: ProcessGroups,
    comm_dtype: Optional[torch.dtype] = None,
    ring_zigzag: bool = True,
    ring_backend: str = "auto",
) -> UlyssesAttention:
    """Make ``model`` (an HF ``PreTrainedModel``) run attention sequence-parallel over ``groups``:
    Ulysses over ``groups.ulysses_group`` and, when ``groups.ring > 1``, ring attention over
    ``groups.ring_group`` (``ring_zigzag`` must match how the data was sharded).

    At ``groups.sp == 1`` (one rank per sequence) there is no all-to-all: the handler only keeps packed rows'
    samples (position ids restarting) apart: ``sdpa`` one kernel call per segment instead of transformers' dense
    block-diagonal mask, ``eager`` the samples' mask, flash kernels the varlen kernel with every row's samples (the
    strategy applies it so at sp=1 too).

    Idempotent: applying again replaces the previous state. Only this model is affected.
    """
    if getattr(model, "config", None) is None:
        raise TypeError(f"apply_ulysses expects a transformers PreTrainedModel, got {type(model).__name__}.")
    impl = attn_implementation(model)
    if impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"Ulysses cannot wrap attn_implementation={impl!r}; build the model with one of "
            f"{list(SUPPORTED_ATTN_IMPLEMENTATIONS)}."
        )
    if impl == "eager" and groups.sp > 1:
        warnings.warn(
            "Sequence parallelism with attn_implementation='eager': every rank materialises [S, S] attention scores "
            "for its heads over the whole sequence (4 GiB per head at 32K tokens in fp32, more for the softmax). "
            "Fine for short sequences and models that have nothing else (Gemma-2's soft-capping without "
            "flash-attn); for long ones use attn_implementation='flash_attention_2' or 'sdpa'.",
            stacklevel=2,
        )
    remove_ulysses(model)
    ctx = UlyssesAttention(groups, comm_dtype, ring_zigzag, ring_backend, attn_implementation=impl)
    set_sp_attention(model, ctx)
    setattr(model, _HOOKS_ATTR, [model.register_forward_pre_hook(_reset_calls), model.register_forward_hook(_check_routed)])
    # transformers' masks would describe the shard only (or be dense for packed rows); the handler builds its own
    setattr(model, _MASK_HOOKS_ATTR, own_masks(model))
    return ctx


def remove_ulysses(model: torch.nn.Module) -> None:
    """Undo :func:`apply_ulysses` (the process-wide dispatcher stays; it is a no-op for untagged modules)."""
    for attr in (_HOOKS_ATTR, _MASK_HOOKS_ATTR):
        for h in getattr(model, attr, []):
            h.remove()
        if hasattr(model, attr):
            delattr(model, attr)
    set_sp_attention(model, None)


def ulysses_of(model: torch.nn.Module) -> Optional[UlyssesAttention]:
    handler = sp_attention_of(model)
    return handler if isinstance(handler, UlyssesAttention) else None


__all__ = [
    "UlyssesAttention",
    "all_to_all",
    "apply_ulysses",
    "causal_mask",
    "heads_to_seq",
    "remove_ulysses",
    "seq_to_heads",
    "ulysses_of",
]
