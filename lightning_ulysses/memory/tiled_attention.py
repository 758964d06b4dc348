"""The tiled attention backward as a memory trick: transformers' ``sdpa`` kernel replaced, per model, by
:func:`lightning_ulysses.kernels.tiled.tiled_attention` where that is exact (the kernel module says why and
what it costs), the original kernel everywhere else."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_ulysses.compat.transformers import attn_implementation
from lightning_ulysses.kernels.attention import select_kernel
from lightning_ulysses.kernels.dispatch import local_attention_of, plain_causal, set_local_attention
from lightning_ulysses.kernels.tiled import DEFAULT_TILE_TOKENS, tiled_attention
from lightning_ulysses.memory.trick import MemoryTrick


class TiledAttentionCore:
    """A local kernel for transformers' ``sdpa`` interface: :func:`tiled_attention` where it is exact,
    the original kernel everywhere else. Signature: ``(original, module, q, k, v, mask, **kwargs)``."""

    def __init__(self, tile_tokens: int = DEFAULT_TILE_TOKENS, backend: str = "auto") -> None:
        if tile_tokens < 1:
            raise ValueError(f"tiled attention tile_tokens must be positive, got {tile_tokens}.")
        select_kernel(torch.device("cpu"), torch.float32, backend)  # validates the name
        self.tile_tokens = tile_tokens
        self.backend = backend
        self.calls = 0  # how many calls took the tiled path (tests, benchmarks)

    def serves(self, module: torch.nn.Module, q: Tensor, k: Tensor, mask: Optional[Tensor], kwargs: dict) -> bool:
        return (
            mask is None  # a mask means packing, padding or a sliding window: not plain causal
            and plain_causal(module, kwargs)
            and q.shape[2] == k.shape[2] > 1
            and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad)
        )

    def __call__(
        self, original: Callable, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
        attention_mask: Optional[Tensor], *args: Any, **kwargs: Any,
    ) -> tuple[Tensor, None]:
        if args or not self.serves(module, query, key, attention_mask, kwargs):
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        self.calls += 1
        out = tiled_attention(query, key, value, kwargs.get("scaling"), self.tile_tokens, self.backend)
        return out.transpose(1, 2).contiguous(), None  # HF kernels return [b, s, h, d]


def enable_tiled_attention(model: torch.nn.Module, tile_tokens: Optional[int] = None, backend: str = "auto") -> TiledAttentionCore:
    """Give ``model``'s attention a tiled backward (idempotent; replaces an earlier setting).

    Needs ``attn_implementation="sdpa"`` (the kernel it replaces); composes with Ulysses.
    """
    impl = attn_implementation(model)
    if impl != "sdpa":
        raise ValueError(
            f"tiled attention backward replaces the 'sdpa' attention kernel, but this model uses {impl!r}; build it "
            "with attn_implementation='sdpa' or turn the option off."
        )
    core = TiledAttentionCore(tile_tokens or DEFAULT_TILE_TOKENS, backend)
    set_local_attention(model, core)
    return core


def disable_tiled_attention(model: torch.nn.Module) -> None:
    if isinstance(local_attention_of(model), TiledAttentionCore):
        set_local_attention(model, None)


def tiled_attention_of(model: torch.nn.Module) -> Optional[TiledAttentionCore]:
    local = local_attention_of(model)
    return local if isinstance(local, TiledAttentionCore) else None


class TiledAttentionBackward(MemoryTrick):
    """Attention whose backward runs on query x key tiles with the forward's output and log-sum-exp: bounds the
    attention kernel's backward workspace, the largest transient of a long-sequence step. Exact; ``sdpa``
    models only.

    Args:
        tile_tokens: queries (and keys) per tile; default 16384.
        backend: block kernel: ``"auto"`` (cuDNN on CUDA, the flash CPU op on CPU), ``"cudnn"``,
            ``"flash"``, ``"cpu"``, ``"math"``.
    """

    order = 60
    flag = "tiled_attention_backward"
    flag_options = {"tiled_attention_tile_tokens": "tile_tokens"}

    def __init__(self, tile_tokens: Optional[int] = None, backend: str = "auto") -> None:
        if tile_tokens is not None and (isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 1):
            raise ValueError(f"tiled attention tile_tokens must be a positive int or None, got {tile_tokens!r}.")
        TiledAttentionCore(tile_tokens or 1, backend)  # validates the backend at construction
        self.tile_tokens = tile_tokens
        self.backend = backend

    def apply(self, model: torch.nn.Module) -> None:
        enable_tiled_attention(model, self.tile_tokens, self.backend)

    def remove(self, model: torch.nn.Module) -> None:
        disable_tiled_attention(model)


__all__ = ["TiledAttentionBackward", "TiledAttentionCore", "disable_tiled_attention", "enable_tiled_attention",
           "tiled_attention_of"]
