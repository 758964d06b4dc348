"""Ulysses attention for Hugging Face models: sequence-sharded -> head-sharded -> sequence-sharded.

Every rank of an SP group of size ``sp`` holds ``c = S / sp`` consecutive tokens of each sequence.
Attention needs the whole sequence, so before the core kernel one all-to-all trades sequence for
heads (each rank then holds all ``S`` tokens of ``h / sp`` heads), and one after trades them back.
Everything else in the model (norms, MLP, projections, loss) is token-local and runs on the shard.

How it hooks into transformers without touching other models in the process:
HF attention layers call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation)``.
We wrap that entry (``sdpa``, ``flash_attention_2``...) once with a *dispatcher* that looks for a
:class:`UlyssesAttention` attached to the calling module. Modules of a model passed to
:func:`apply_ulysses` carry one; any other model (a reference model, a teacher, an eval copy) has
none and goes straight to the original kernel. Keeping the original key, instead of registering a
new name, keeps every HF branch that tests ``_attn_implementation == "flash_attention_2"`` intact.
The same dispatcher also honours a per-model replacement of the local kernel
(:func:`set_local_attention`, used by :mod:`lightning_ulysses.tiled_attention`), with or without Ulysses.

Unlike DeepSpeed's ``UlyssesSPAttentionHF``, batch size and sequence length are read from the
tensors at every call (nothing is fixed at registration), and causality is re-derived from the
*global* position ids, so packed sequences (position ids restarting at 0) stay correct; with ``sdpa``
a packed row runs one kernel call per segment (:func:`lightning_ulysses.tiled_attention.packed_causal_attention`)
instead of a dense ``[S, S]`` mask, which would take S^2 bytes per row (64 GiB at 256K tokens).

With a ring dimension (``sp = ulysses x ring``) the all-to-all runs over the Ulysses group only and
gathers one ring *segment*; :func:`lightning_ulysses.ring.ring_attention` then attends across the
ring group instead of the HF kernel (ulysses == 1: no all-to-all at all).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from lightning_ulysses.data import packed_segments
from lightning_ulysses.layout import SUPPORTED_ATTN_IMPLEMENTATIONS, ProcessGroups, heads_allow
from lightning_ulysses.ring import RingGroup, ring_attention

_CTX_ATTR = "_lightning_ulysses_attention"
# a replacement for the local kernel (same signature as HF's, plus the original first): the tiled
# attention backward. Under Ulysses it runs on the gathered sequence, without SP on the module's own.
_LOCAL_ATTR = "_lightning_ulysses_local_attention"
_DISPATCH_MARK = "_lightning_ulysses_dispatch"
_install_lock = threading.Lock()


def all_to_all(x: Tensor, group: dist.ProcessGroup, comm_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Differentiable all-to-all over dim 0 (``x.shape[0] == group size``): slot ``j`` goes to rank ``j``.

    Its backward is the same exchange, so torch's autograd-aware functional collective is all we
    need (it also traces under torch.compile, unlike the deprecated ``torch.distributed.nn`` one).
    ``comm_dtype`` optionally casts for the wire (e.g. fp32 activations sent as bf16).
    """
    orig_dtype = x.dtype
    if comm_dtype is not None and comm_dtype != orig_dtype:
        x = x.to(comm_dtype)
    x = x.contiguous()
    out = wait_tensor(all_to_all_single_autograd(x, None, None, group))
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
    """Per-model state: the Ulysses / ring groups and the global position ids of the current forward.

    Gathering the position ids is one small all-gather per forward: every layer of that forward
    (and the recompute of checkpointed layers) receives the same ``position_ids`` tensor object, so
    it is cached on identity. The cache decision depends only on program order, which is the same on
    every SP rank, so the collective stays matched across ranks.
    """

    def __init__(
        self,
        groups: ProcessGroups,
        comm_dtype: Optional[torch.dtype] = None,
        ring_zigzag: bool = True,
        ring_backend: str = "auto",
    ) -> None:
        if groups.sp_group is None:
            raise ValueError("UlyssesAttention needs an SP group (sequence_parallel_size > 1).")
        self.sp_group = groups.sp_group  # every rank of the sequence: what the loss reduces over
        self.group = groups.ulysses_group  # the all-to-all group; None when ulysses == 1 (ring only)
        self.sp = groups.ulysses
        self.ring_group = groups.ring_group
        self.ring_zigzag = ring_zigzag
        self.ring_backend = ring_backend
        self._ring_peers: Optional[RingGroup] = None  # neighbours, resolved once (attention calls are hot)
        self.comm_dtype = comm_dtype
        self.calls = 0
        self._pos_local: Optional[Tensor] = None
        self._pos_global: Optional[Tensor] = None
        self._segments: Optional[Tensor] = None
        self._bounds: Optional[list] = None  # per row (start, end) of packed segments, computed on first use

    def _global_positions(self, local: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if local is not self._pos_local:
            # [b, c] x sp -> [b, S]; rank order == sequence order (contiguous sharding)
            parts = [torch.empty_like(local) for _ in range(self.sp)]
            dist.all_gather(parts, local.contiguous(), group=self.group)
            self._pos_local = local
            self._pos_global = torch.cat(parts, dim=1)
            self._segments = packed_segments(self._pos_global)
            self._bounds = None
        return self._pos_global, self._segments

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
        sp = self.sp
        hq, hkv = query.shape[1], key.shape[1]
        if not heads_allow(sp, hq, hkv):
            raise ValueError(
                f"Ulysses sp={sp} cannot split this layer's heads (q={hq}, kv={hkv}); choose a "
                "sequence_parallel_size that divides the query heads and divides or is a multiple of the kv heads."
            )
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError(
                "Ulysses attention needs position_ids in the model call: each shard only knows its own tokens, so "
                "causal masking is rebuilt from the global positions. Pass position_ids=batch['position_ids'] "
                "(the strategy's data sharding creates them) to the model's forward."
            )
        # GQA/MQA with fewer kv heads than ranks: replicate each kv head sp/hkv times so every rank
        # receives exactly the kv head its query heads use (their group boundaries line up).
        if hkv < sp:
            key = key.repeat_interleave(sp // hkv, dim=1)
            value = value.repeat_interleave(sp // hkv, dim=1)
        # [b, h, c, d] -> [b, h/sp, S, d]
        if self.group is not None:
            q, k, v = seq_to_heads([query, key, value], sp, self.group, self.comm_dtype)
        else:
            q, k, v = query, key, value
        if self.ring_group is not None:
            # ring layouts are causal over one sequence per row (the data layer refuses packing), so the
            # global positions are not needed here: no gather
            out = self._ring(module, q, k, v, kwargs)  # [b, S_segment, h/sp, d]
            return (heads_to_seq(out, sp, self.group, self.comm_dtype) if self.group is not None else out), None

        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        pos_global, segments = self._global_positions(position_ids)
        if pos_global.shape[0] == 1 and query.shape[0] > 1:
            pos_global = pos_global.expand(query.shape[0], -1)
            segments = segments.expand(query.shape[0], -1) if segments is not None else None
        kwargs["position_ids"] = pos_global
        impl = getattr(getattr(module, "config", None), "_attn_implementation", "sdpa")
        if impl == "sdpa":
            window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
            if window is not None and window >= q.shape[2]:
                window = None
            if segments is not None and window is None and plain_causal(module, kwargs):
                # packed rows: one kernel call per segment instead of an [S, S] mask (S^2 bytes per row)
                out = self._packed(module, q, k, v, kwargs)
                return heads_to_seq(out, sp, self.group, self.comm_dtype), None
            # HF built a mask for the *local* shard; it is meaningless for the gathered sequence.
            mask = causal_mask(pos_global, segments, window) if (segments is not None or window) else None
        else:
            # Flash kernels take causality (and packing, through position_ids) from the kwargs.
            mask = None

        groups_local = q.shape[1] // k.shape[1]
        restore = None
        if hasattr(module, "num_key_value_groups") and module.num_key_value_groups != groups_local:
            restore, module.num_key_value_groups = module.num_key_value_groups, groups_local
        try:
            out, weights = core(module, q, k, v, mask, *args, **kwargs)  # out: [b, S, h/sp, d]
        finally:
            if restore is not None:
                module.num_key_value_groups = restore
        return heads_to_seq(out, sp, self.group, self.comm_dtype), weights


    def _packed(self, module: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> Tensor:
        from lightning_ulysses.tiled_attention import packed_causal_attention, segment_bounds

        if self._bounds is None:
            self._bounds = segment_bounds(self._segments)  # the same for every layer of this forward
        bounds = self._bounds if len(self._bounds) == q.shape[0] else self._bounds * q.shape[0]
        local = getattr(module, _LOCAL_ATTR, None)  # the tiled backward, if enabled, tiles long segments
        out = packed_causal_attention(
            q, k, v, bounds, scale=kwargs.get("scaling"), tile_tokens=getattr(local, "tile_tokens", None),
            backend=getattr(local, "backend", "auto"),
        )
        return out.transpose(1, 2)  # [b, S, h/sp, d], as HF kernels return

    def _ring(self, module: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> Tensor:
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
        out = ring_attention(
            q, k, v, self._ring_peers, scale=kwargs.get("scaling"), zigzag=self.ring_zigzag, backend=self.ring_backend
        )
        return out.transpose(1, 2)


def plain_causal(module: torch.nn.Module, kwargs: dict) -> bool:
    """Whether an HF attention call (its module and kwargs) asks for plain causal attention: causal, no
    dropout, no logit softcapping, no attention sinks. What the LSE block kernels compute exactly (the
    packed-row path here, :class:`lightning_ulysses.tiled_attention.TiledAttentionCore`)."""
    is_causal = kwargs.get("is_causal")
    return bool(
        (getattr(module, "is_causal", True) if is_causal is None else is_causal)
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
    )


def install_attention_dispatcher(impl: str) -> None:
    """Wrap the global HF attention function ``impl`` once per process (idempotent).

    The wrapper consults two attributes of the calling module: a local-kernel replacement
    (:func:`set_local_attention`) and the Ulysses state (:func:`apply_ulysses`); modules with neither
    get the original function.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    with _install_lock:
        original = ALL_ATTENTION_FUNCTIONS[impl]
        if getattr(original, _DISPATCH_MARK, False):
            return

        def ulysses_dispatch(module, query, key, value, attention_mask, *args, **kwargs):
            local = getattr(module, _LOCAL_ATTR, None)
            core = original if local is None else functools.partial(local, original)
            ctx = getattr(module, _CTX_ATTR, None)
            if ctx is None:
                return core(module, query, key, value, attention_mask, *args, **kwargs)
            return ctx(core, module, query, key, value, attention_mask, *args, **kwargs)

        setattr(ulysses_dispatch, _DISPATCH_MARK, True)
        ulysses_dispatch.__wrapped__ = original  # type: ignore[attr-defined]
        if impl in ALL_ATTENTION_FUNCTIONS._local_mapping:
            ALL_ATTENTION_FUNCTIONS[impl] = ulysses_dispatch
        else:
            AttentionInterface.register(impl, ulysses_dispatch)


def _check_routed(model: torch.nn.Module, args: Any, output: Any) -> None:
    ctx: UlyssesAttention = getattr(model, _CTX_ATTR)
    if ctx.calls == 0:
        raise RuntimeError(
            "The model ran a forward pass under sequence parallelism but none of its attention calls went through "
            "the Ulysses wrapper, so every rank attended only to its own shard. This model's attention does not use "
            "transformers' global ALL_ATTENTION_FUNCTIONS; it is not supported by lightning_ulysses yet."
        )


def _reset_calls(model: torch.nn.Module, args: Any) -> None:
    getattr(model, _CTX_ATTR).calls = 0


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

    Idempotent: applying again replaces the previous state. Only this model is affected.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"apply_ulysses expects a transformers PreTrainedModel, got {type(model).__name__}.")
    impl = config._attn_implementation
    if impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"Ulysses cannot wrap attn_implementation={impl!r}; build the model with one of "
            f"{list(SUPPORTED_ATTN_IMPLEMENTATIONS)}."
        )
    remove_ulysses(model)
    install_attention_dispatcher(impl)
    ctx = UlyssesAttention(groups, comm_dtype=comm_dtype, ring_zigzag=ring_zigzag, ring_backend=ring_backend)
    # Every module that calls the attention interface reads ``self.config``; tagging all of them is
    # exact without knowing each architecture's attention class name.
    for m in model.modules():
        if getattr(m, "config", None) is not None:
            setattr(m, _CTX_ATTR, ctx)
    handles = [model.register_forward_pre_hook(_reset_calls), model.register_forward_hook(_check_routed)]
    model._lightning_ulysses_hooks = handles  # type: ignore[attr-defined]
    return ctx


def remove_ulysses(model: torch.nn.Module) -> None:
    """Undo :func:`apply_ulysses` (the process-wide dispatcher stays; it is a no-op for untagged modules)."""
    for h in getattr(model, "_lightning_ulysses_hooks", []):
        h.remove()
    if hasattr(model, "_lightning_ulysses_hooks"):
        del model._lightning_ulysses_hooks
    for m in model.modules():
        if hasattr(m, _CTX_ATTR):
            delattr(m, _CTX_ATTR)


def set_local_attention(model: torch.nn.Module, local: Optional[Callable]) -> None:
    """Route ``model``'s attention kernel calls through ``local(original, module, q, k, v, mask, **kw)``
    (``None`` removes it). Composes with :func:`apply_ulysses` in either order."""
    if local is not None:
        install_attention_dispatcher(model.config._attn_implementation)
    for m in model.modules():
        if getattr(m, "config", None) is not None:
            if local is not None:
                setattr(m, _LOCAL_ATTR, local)
            elif hasattr(m, _LOCAL_ATTR):
                delattr(m, _LOCAL_ATTR)


def local_attention_of(model: torch.nn.Module) -> Optional[Callable]:
    return getattr(model, _LOCAL_ATTR, None)


def ulysses_of(model: torch.nn.Module) -> Optional[UlyssesAttention]:
    return getattr(model, _CTX_ATTR, None)


__all__ = [
    "UlyssesAttention",
    "apply_ulysses",
    "heads_to_seq",
    "install_attention_dispatcher",
    "local_attention_of",
    "plain_causal",
    "remove_ulysses",
    "seq_to_heads",
    "set_local_attention",
    "ulysses_of",
]
