"""Memory-efficient RMSNorm: saves the input in its own dtype and one fp32 scalar per token.

HF's ``LlamaRMSNorm`` (and Qwen/Mistral's) upcasts to fp32 and autograd keeps that fp32 copy for
backward: 4 bytes per hidden unit per token per norm (16 KiB per token for a 4096-wide model, two
norms per layer), on top of the bf16 normalised output. This version saves the input (2 bytes per
unit, usually shared with what the next op saves anyway) and ``rstd`` (one fp32 per token), and
recomputes the normalised values in backward. Same arithmetic as HF's forward; gradients equal to
rounding (weight gradients are summed in fp32).

On CUDA with liger-kernel installed (``impl="auto"``), Liger's RMSNorm kernel runs instead: the same
saved tensors (input + rstd, "llama" casting) in one Triton pass each way, where the torch version
loops over row chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ulysses.kernels.impl import check_impl, use_liger
from lightning_ulysses.memory.module_swap import any_swapped, is_swapped, restore_class, settings, swap_class
from lightning_ulysses.memory.trick import MemoryTrick

KIND = "MemoryEfficient"


# Rows per chunk: the fp32 temporaries of one chunk stay at CHUNK_ROWS * hidden * 4 bytes (128 MiB at
# hidden 4096) instead of several fp32 copies of the whole [tokens, hidden] activation, which measured
# as the step's memory peak (benchmarks/memory_peak.py) before chunking.
CHUNK_ROWS = 8192


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with fp32 statistics, as in HF Llama."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(rows, dtype=torch.result_type(weight, x))
        rstd = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
        for s in range(0, rows.shape[0], CHUNK_ROWS):
            xf = rows[s : s + CHUNK_ROWS].float()
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [t, 1] fp32
            rstd[s : s + CHUNK_ROWS] = r
            out[s : s + CHUNK_ROWS] = weight * (xf * r).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, rstd = ctx.saved_tensors
        rows, g_rows = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, x.shape[-1])
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(rows) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, rows.shape[0], CHUNK_ROWS):
            r = rstd[s : s + CHUNK_ROWS]
            xhat = rows[s : s + CHUNK_ROWS].float() * r  # recomputed instead of saved
            go = g_rows[s : s + CHUNK_ROWS]
            if need_w:
                grad_w += (go.float() * xhat.to(x.dtype).float()).sum(0)
            if need_x:
                g = (go * weight).float()  # d xhat, as HF's autograd computes it (in the weight dtype)
                grad_x[s : s + CHUNK_ROWS] = (r * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return (
            grad_x.view_as(x) if need_x else None,
            grad_w.to(weight.dtype) if need_w else None,
            None,
        )


def _subclass(cls: type) -> type:
    class Sub(cls):  # type: ignore[misc, valid-type]
        def forward(self, hidden_states: Tensor) -> Tensor:
            if use_liger(settings(self)["rmsnorm_impl"], hidden_states, "memory-efficient RMSNorm"):
                from liger_kernel.ops.rms_norm import LigerRMSNormFunction

                # "llama" casting = HF's: fp32 statistics, normalised value cast to the input dtype, then * weight
                return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", True)
            return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)

    return Sub


def _is_llama_style_rmsnorm(m: torch.nn.Module) -> bool:
    name = type(m).__name__
    return (
        name.endswith("RMSNorm")
        and "Gemma" not in name  # Gemma scales by (1 + weight)
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and isinstance(getattr(m, "variance_epsilon", None), float)
    )


def enable_memory_efficient_rmsnorm(model: torch.nn.Module, impl: str = "auto") -> int:
    """Swap every Llama-style RMSNorm of ``model`` (idempotent). Returns how many were swapped.

    ``impl``: ``"auto"`` (Liger's kernel on CUDA when installed, else torch), ``"torch"``, ``"liger"``.
    """
    check_impl(impl, "memory-efficient RMSNorm")
    norms = [m for m in model.modules() if _is_llama_style_rmsnorm(m) or is_swapped(m, KIND)]
    for m in norms:
        swap_class(m, KIND, _subclass)
        settings(m)["rmsnorm_impl"] = impl
    return len(norms)


def disable_memory_efficient_rmsnorm(model: torch.nn.Module) -> None:
    for m in model.modules():
        restore_class(m, KIND)


def memory_efficient_rmsnorm_enabled(model: torch.nn.Module) -> bool:
    return any_swapped(model, KIND)


class MemoryEfficientRMSNorm(MemoryTrick):
    """Llama-style RMSNorms that keep their input, not an fp32 copy, for backward (this module's docstring).

    Args:
        impl: ``"auto"`` (Liger's kernel on CUDA when liger-kernel is installed, else torch),
            ``"torch"`` or ``"liger"``.
    """

    order = 40
    flag = "memory_efficient_rmsnorm"
    flag_options = {"memory_efficient_impl": "impl"}

    def __init__(self, impl: str = "auto") -> None:
        check_impl(impl, "memory-efficient RMSNorm")
        self.impl = impl

    def apply(self, model: torch.nn.Module) -> None:
        enable_memory_efficient_rmsnorm(model, self.impl)

    def remove(self, model: torch.nn.Module) -> None:
        disable_memory_efficient_rmsnorm(model)


__all__ = [
    "MemoryEfficientRMSNorm",
    "RMSNormFunction",
    "disable_memory_efficient_rmsnorm",
    "enable_memory_efficient_rmsnorm",
    "memory_efficient_rmsnorm_enabled",
]
