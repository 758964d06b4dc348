"""A CPU stand-in for the flash-attn 2 kernels, for tests only.

transformers' own ``flash_attention_2`` path (its attention-interface entry, ``_flash_attention_forward``: the
choice between the dense and the varlen kernel, ``cu_seqlens`` from position ids or from the caller's kwargs)
runs unchanged; only the two kernels underneath are these torch functions, which attend each ``cu_seqlens``
segment on its own (SDPA; explicit scores for sliding windows and logit soft-capping). They count their calls, so a test can tell which kernel a packed row reached.
What this cannot test is flash-attn's CUDA code itself: docs/benchmarks.md has the GPU runs with the real one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

CALLS = {"dense": 0, "varlen": 0, "varlen_segments": 0}


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale, window_size: tuple = (-1, -1),
            softcap: float = 0.0) -> torch.Tensor:
    """``[s, h, d]`` q and ``[s, hk, d]`` k/v -> ``[s, h, d]``: SDPA, or explicit scores where flash-attn's window
    (query ``i`` sees keys ``i - left .. i + right``) or logit soft-capping (``softcap * tanh(scores / softcap)``)
    applies."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if tuple(window_size) == (-1, -1) and not softcap:
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             is_causal=causal, scale=scale, enable_gqa=True)
        return out.transpose(0, 1)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(q.shape[0])[:, None]
    j = torch.arange(k.shape[0])[None, :]
    allowed = torch.ones_like(i - j, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    left, right = window_size
    if left >= 0:
        allowed &= i - j <= left
    if right >= 0:
        allowed &= j - i <= right
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", probs, v)


def _refuse(dropout_p: float) -> None:
    if dropout_p:
        raise NotImplementedError("fake flash-attn: attention dropout is not modelled")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False):
    """``[b, s, h, d]``: every row is one sequence (what the real kernel assumes)."""
    _refuse(dropout_p)
    CALLS["dense"] += 1
    return torch.stack([_attend(q[i], k[i], v[i], causal, softmax_scale, window_size, softcap) for i in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    """``[total, h, d]`` tokens of several sequences, sequence ``i`` at ``cu_seqlens[i]:cu_seqlens[i + 1]``."""
    _refuse(dropout_p)
    # what the real kernel demands of its arguments
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k), (cu_seqlens_q, cu_seqlens_k)
    bounds = cu_seqlens_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0] and all(a < b for a, b in zip(bounds, bounds[1:])), bounds
    assert int(max_seqlen_q) == max(b - a for a, b in zip(bounds, bounds[1:])), (max_seqlen_q, bounds)
    CALLS["varlen"] += 1
    CALLS["varlen_segments"] += len(bounds) - 1
    return torch.cat([_attend(q[a:b], k[a:b], v[a:b], causal, softmax_scale, window_size, softcap)
                      for a, b in zip(bounds, bounds[1:])])


_PATCHED = ("_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn", "_unpad_fn", "_process_flash_kwargs_fn",
            "_process_with_kvcache_kwargs_fn", "_loaded_implementation")


def install() -> Callable[[], None]:
    """Make ``attn_implementation="flash_attention_2"`` load and run on CPU with the kernels above; returns the
    function that undoes it (a pytest process shares transformers with other tests)."""
    import transformers.modeling_flash_attention_utils as fa
    from transformers import PreTrainedModel

    saved = {name: getattr(fa, name) for name in _PATCHED}
    can_dispatch = PreTrainedModel.__dict__["_flash_attn_can_dispatch"]
    # transformers >= 5.2x: flash-attn not installed and the `kernels` package present -> it fetches a hub kernel
    # instead; say flash-attn 2 is installed (the kernels above stand in for it)
    matrix = getattr(fa, "FLASH_ATTENTION_COMPATIBILITY_MATRIX", {}).get(2)
    available = matrix["general_availability_check"] if matrix else None
    if matrix:
        matrix["general_availability_check"] = lambda *args, **kwargs: True
    # the load-time check wants flash-attn installed and a CUDA device
    PreTrainedModel._flash_attn_can_dispatch = lambda self, flash_attn_version, is_init_check=False: True
    # what lazy_import_flash_attention("flash_attention_2") would have loaded from the flash_attn package
    fa._flash_fn, fa._flash_varlen_fn, fa._flash_with_kvcache_fn = flash_attn_func, flash_attn_varlen_func, None
    fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
    fa._process_flash_kwargs_fn = fa._lazy_define_process_function(flash_attn_varlen_func)
    fa._process_with_kvcache_kwargs_fn = dict
    fa._loaded_implementation = "flash_attention_2"

    def undo() -> None:
        for name, value in saved.items():
            setattr(fa, name, value)
        PreTrainedModel._flash_attn_can_dispatch = can_dispatch
        if matrix:
            matrix["general_availability_check"] = available

    return undo
