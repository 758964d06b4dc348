"""Memory-efficient SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` that keeps only ``gate`` and ``up``.

HF's Llama/Qwen/Mistral MLP leaves four ``[tokens, intermediate]`` tensors to autograd: ``gate``
(for silu's backward), ``silu(gate)`` and ``up`` (for the product's backward) and the product (for
``down_proj``'s weight gradient). This version fuses ``silu(gate) * up`` into one autograd op that saves
``gate`` and ``up`` and recomputes ``silu(gate)`` in backward: one ``[tokens, intermediate]`` tensor
less per layer (1.75 GiB at 64K tokens for Llama-3-8B's 14336), and on CUDA Liger's fused kernel
(one pass instead of three elementwise kernels each way).

The torch implementation runs HF's own ops (``silu``, ``mul``, ``silu_backward``) in row chunks, so
its values and gradients are HF's bit for bit; Liger's kernel rounds once instead of twice (bf16 noise).
Combines with :mod:`lightning_ulysses.memory.tiled_mlp`: tiles then use this op too (it is the MLP's inner
forward, :func:`lightning_ulysses.memory.module_swap.set_inner_forward`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ulysses.kernels.impl import check_impl, use_liger
from lightning_ulysses.memory.module_swap import set_inner_forward, settings
from lightning_ulysses.memory.trick import MemoryTrick

KIND = "MemoryEfficientSwiGLU"
_IMPL = "swiglu_impl"  # settings(mlp) key: set <=> this MLP runs the fused op

# Rows per chunk: bounds the temporaries of one chunk (a few [rows, intermediate] tensors) instead of
# whole-activation copies.
CHUNK_ROWS = 8192


class SwiGLUFunction(torch.autograd.Function):
    """``silu(a) * b`` saving ``a`` and ``b`` only."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ra, rb = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        out = torch.empty_like(ra, dtype=torch.result_type(a, b))
        for s in range(0, ra.shape[0], CHUNK_ROWS):
            out[s : s + CHUNK_ROWS] = F.silu(ra[s : s + CHUNK_ROWS]) * rb[s : s + CHUNK_ROWS]
        ctx.save_for_backward(a, b)
        return out.view(*a.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        a, b = ctx.saved_tensors
        ra, rb, rg = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), grad_out.reshape(-1, a.shape[-1])
        need_a, need_b = ctx.needs_input_grad
        grad_a = torch.empty_like(ra) if need_a else None
        grad_b = torch.empty_like(rb) if need_b else None
        for s in range(0, ra.shape[0], CHUNK_ROWS):
            ca, cg = ra[s : s + CHUNK_ROWS], rg[s : s + CHUNK_ROWS]
            if need_a:  # the ops HF's autograd runs: d(silu) = g * b, then silu's backward
                grad_a[s : s + CHUNK_ROWS] = torch.ops.aten.silu_backward(cg * rb[s : s + CHUNK_ROWS], ca)
            if need_b:
                grad_b[s : s + CHUNK_ROWS] = cg * F.silu(ca)
        return (grad_a.view_as(a) if need_a else None, grad_b.view_as(b) if need_b else None)


def swiglu(a: Tensor, b: Tensor, impl: str = "auto") -> Tensor:
    """``silu(a) * b`` keeping only ``a`` and ``b`` for backward (Liger's kernel on CUDA with ``auto``)."""
    if use_liger(impl, a, "memory-efficient SwiGLU"):
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(a, b)
    return SwiGLUFunction.apply(a, b)


def swiglu_mlp_forward(mlp: torch.nn.Module, x: Tensor) -> Tensor:
    # submodule calls (not functional weights) so ZeRO-3 gathers each projection through its hooks
    return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x), settings(mlp)[_IMPL]))


def uses_memory_efficient_swiglu(mlp: torch.nn.Module) -> bool:
    return _IMPL in settings(mlp)


def is_swiglu_mlp(m: torch.nn.Module) -> bool:
    """An HF gated MLP: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU."""
    act = getattr(m, "act_fn", None)
    return (
        # projections are called as modules, so LoRA-wrapped ones (peft's lora.Linear) qualify too
        all(isinstance(getattr(m, n, None), torch.nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
        and act is not None
        and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation")
    )


def enable_memory_efficient_swiglu(model: torch.nn.Module, impl: str = "auto") -> int:
    """Fuse ``silu(gate) * up`` in every SiLU-gated MLP of ``model`` (idempotent). Returns how many."""
    check_impl(impl, "memory-efficient SwiGLU")
    mlps = [m for m in model.modules() if is_swiglu_mlp(m)]
    if not mlps:
        raise ValueError(
            f"memory_efficient_swiglu found no SiLU-gated MLP (gate_proj/up_proj/down_proj + SiLU) in "
            f"{type(model).__name__}; turn the option off for this model."
        )
    for m in mlps:
        settings(m)[_IMPL] = impl
        set_inner_forward(m, swiglu_mlp_forward, KIND)  # a tiled MLP calls it per tile
    return len(mlps)


def disable_memory_efficient_swiglu(model: torch.nn.Module) -> None:
    for m in model.modules():
        if uses_memory_efficient_swiglu(m):
            del settings(m)[_IMPL]
            set_inner_forward(m, None, KIND)


def memory_efficient_swiglu_enabled(model: torch.nn.Module) -> bool:
    return any(uses_memory_efficient_swiglu(m) for m in model.modules())


class MemoryEfficientSwiGLU(MemoryTrick):
    """SiLU-gated MLPs that keep ``gate`` and ``up`` only, recomputing ``silu(gate)`` in backward; combines with
    :class:`~lightning_ulysses.memory.tiled_mlp.TiledMLP`.

    Args:
        impl: ``"auto"`` (Liger's fused kernel on CUDA when liger-kernel is installed, else torch),
            ``"torch"`` or ``"liger"``.
    """

    order = 50
    flag = "memory_efficient_swiglu"
    flag_options = {"memory_efficient_impl": "impl"}

    def __init__(self, impl: str = "auto") -> None:
        check_impl(impl, "memory-efficient SwiGLU")
        self.impl = impl

    def apply(self, model: torch.nn.Module) -> None:
        enable_memory_efficient_swiglu(model, self.impl)

    def remove(self, model: torch.nn.Module) -> None:
        disable_memory_efficient_swiglu(model)


__all__ = [
    "MemoryEfficientSwiGLU",
    "SwiGLUFunction",
    "disable_memory_efficient_swiglu",
    "enable_memory_efficient_swiglu",
    "is_swiglu_mlp",
    "memory_efficient_swiglu_enabled",
    "swiglu",
    "swiglu_mlp_forward",
]
