"""Causal/full attention *block* kernels that hand out the log-sum-exp and take one back in backward.

Ring attention and the tiled attention backward both compute attention of a block of queries
against a block of keys and differentiate each block against the *global* softmax normaliser: the
backward of block ``(i, j)`` is ``dS = P_ij * (dP_ij - rowsum(dO_i * O_i))`` with
``P_ij = exp(Q_i K_j^T * scale - lse_i)``, where ``O_i`` / ``lse_i`` are the final output and
log-sum-exp of query block ``i``. Summing the block gradients over ``j`` gives the exact gradient.
Every kernel here accepts such an externally supplied ``(out, lse)`` in backward:

* ``cudnn``: torch's cuDNN SDPA ops (measured ~2x flash on H200 for GQA shapes);
* ``flash``: torch's flash SDPA ops;
* ``cpu``: torch's flash CPU op (what the CPU tests run);
* ``math``: fp32 matmuls, any device/dtype, ``O(s_q * s_k)`` memory per block (reference only).

Layouts are ``[b, h, s, d]`` with as many kv heads as query heads (callers expand GQA with
:func:`expand_kv` and fold the gradients back with :func:`reduce_kv`); ``lse`` is ``[b, h, s]`` fp32.
Causal masks are top-left aligned (query ``t`` sees keys ``<= t``), as in SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

KERNEL_BACKENDS = ("auto", "cudnn", "flash", "cpu", "math")


class AttentionKernel:
    """One attention block that returns ``(out, lse [b, h, s_q] fp32, aux)`` and differentiates with a given lse.

    ``aux`` is the kernel's metadata from forward; :meth:`block_aux` builds it for a block whose
    forward was never run on its own (the tiled backward computes forward on the whole sequence).
    """

    name = "base"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
        raise NotImplementedError

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, aux: Any, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def block_aux(self, aux: Any, s_q: int, s_k: int) -> Any:
        return aux


class _CPUKernel(AttentionKernel):
    name = "cpu"

    def forward(self, q, k, v, causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )


class _FlashKernel(AttentionKernel):
    name = "flash"

    def forward(self, q, k, v, causal, scale):
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        return out, lse, (cq, ck, mq, mk, seed, offset)

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        cq, ck, mq, mk, seed, offset = aux
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cq, ck, mq, mk, 0.0, causal, seed, offset, scale=scale
        )
        return dq, dk, dv

    def block_aux(self, aux, s_q, s_k):
        cq, ck, _, _, seed, offset = aux  # no dropout: the RNG state is never read
        return cq, ck, s_q, s_k, seed, offset


class _CuDNNKernel(AttentionKernel):
    name = "cudnn"

    def forward(self, q, k, v, causal, scale):
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        b, h, s = q.shape[:3]
        # cuDNN's stats may carry a trailing singleton dim; callers slice and merge on [b, h, s].
        return out, lse.reshape(b, h, s), (lse.dim(), cq, ck, mq, mk, seed, offset)

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        stats_dim, cq, ck, mq, mk, seed, offset = aux
        stats = lse if stats_dim == 3 else lse.unsqueeze(-1)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, stats, seed, offset, None, cq, ck, mq, mk, 0.0, causal, scale=scale
        )
        return dq, dk, dv

    def block_aux(self, aux, s_q, s_k):
        stats_dim, cq, ck, _, _, seed, offset = aux
        return stats_dim, cq, ck, s_q, s_k, seed, offset


class _MathKernel(AttentionKernel):
    """Reference kernel (fp32 scores); any device and dtype. O(s_q * s_k) memory per block."""

    name = "math"

    @staticmethod
    def _scores(q, k, causal, scale):
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if causal:
            sq, sk = q.shape[-2], k.shape[-2]
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)  # top-left aligned, like SDPA
            s = s.masked_fill(mask, float("-inf"))
        return s

    def forward(self, q, k, v, causal, scale):
        s = self._scores(q, k, causal, scale)
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype)
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        p = torch.exp(self._scores(q, k, causal, scale) - lse[..., None])
        do = dout.float()
        dv = torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, v.float().transpose(-1, -2))
        ds = p * (dp - (do * out.float()).sum(-1, keepdim=True))
        dq = torch.matmul(ds, k.float()) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_KERNELS = {"cpu": _CPUKernel, "flash": _FlashKernel, "cudnn": _CuDNNKernel, "math": _MathKernel}


def select_kernel(device: torch.device, dtype: torch.dtype, backend: str = "auto") -> AttentionKernel:
    """The block kernel for ``device``/``dtype``: ``auto`` = cuDNN for 16-bit CUDA tensors (measured
    ~2x flash for GQA shapes on H200), the flash CPU op on CPU, the matmul fallback otherwise."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"attention kernel backend must be one of {list(KERNEL_BACKENDS)}, got {backend!r}.")
    if backend == "auto":
        if device.type == "cuda":
            backend = "cudnn" if dtype in (torch.float16, torch.bfloat16) and torch.backends.cudnn.is_available() else "math"
        elif device.type == "cpu":
            backend = "cpu"
        else:
            backend = "math"
    return _KERNELS[backend]()


def expand_kv(x: Tensor, groups: int) -> Tensor:
    """[b, hkv, s, d] -> [b, hkv * groups, s, d] (GQA: query head i uses kv head i // groups)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reduce_kv(dx: Tensor, groups: int) -> Tensor:
    """Inverse of :func:`expand_kv` for gradients: sum each kv head's query-head copies."""
    if groups == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // groups, groups, s, d).sum(2)


__all__ = ["AttentionKernel", "KERNEL_BACKENDS", "expand_kv", "reduce_kv", "select_kernel"]
