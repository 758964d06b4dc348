"""Transient GPU memory of one causal SDPA backward (beyond its inputs and its dq/dk/dv outputs).

Isolates the attention kernel's backward workspace that ``memory_peak.py`` sees as the largest
"autograd engine" block at long sequences. Llama-3-8B attention at SP=1: 32 q / 8 kv heads, head dim 128.

    python benchmarks/sdpa_backward_memory.py --seq 131072
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    args = p.parse_args()
    s, hq, hkv, d = args.seq, args.heads, args.kv_heads, 128
    unit = s * hq * d * 2  # one bf16 [tokens, hidden] activation
    print(f"seq {s}, {hq} q / {hkv} kv heads; sizes in bf16 [tokens, hidden] units ({unit / 2**30:.2f} GiB, "
          f"{unit / s / 1024:.0f} KiB/token)")
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        q = torch.randn(1, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                g = torch.randn_like(out)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                dq, dk, dv = torch.autograd.grad(out, [q, k, v], g)
                torch.cuda.synchronize()
            outputs = sum(t.numel() * t.element_size() for t in (dq, dk, dv))
            extra = torch.cuda.max_memory_allocated() - base - outputs
            print(f"{name}: backward transient beyond dq/dk/dv = {extra / unit:.3f} units = {extra / s / 1024:.1f} KiB/token")
        except RuntimeError as e:
            print(f"{name}: unavailable ({str(e)[:120]})")
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
