"""GPU check of the memory-efficient RMSNorm and SwiGLU: values, gradients and speed against HF's modules.

For each implementation (HF's module, our torch op, Liger's kernel through ``impl="liger"``): relative
error of the output and of every gradient against an fp32 reference computed from the same bf16
inputs, the bytes autograd keeps for backward, and the median fwd+bwd time. Llama-3-8B widths.

    python benchmarks/kernel_check.py --tokens 65536
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from lightning_ulysses.memory.activation_checkpoint import saved_tensor_bytes


def timed(fn, grads, reps: int = 10) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        torch.autograd.grad(out, grads, torch.ones_like(out))
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_rmsnorm(tokens: int, hidden: int) -> list[dict]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lightning_ulysses.memory.rmsnorm import enable_memory_efficient_rmsnorm

    torch.manual_seed(0)
    x = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    hf = LlamaRMSNorm(hidden, eps=1e-5).cuda().bfloat16()
    hf.weight.data.uniform_(0.5, 1.5)
    ref_norm = LlamaRMSNorm(hidden, eps=1e-5).cuda()
    ref_norm.weight.data.copy_(hf.weight.float())
    xr = x.detach().float().requires_grad_()
    ref = ref_norm(xr)
    ref_grads = torch.autograd.grad(ref, [xr, ref_norm.weight], g.float())
    rows = []
    for impl in ("hf", "torch", "liger"):
        norm = LlamaRMSNorm(hidden, eps=1e-5).cuda().bfloat16()
        norm.weight.data.copy_(hf.weight)
        if impl != "hf":
            enable_memory_efficient_rmsnorm(torch.nn.Sequential(norm), impl=impl)
        out, kept = saved_tensor_bytes(lambda: norm(x))
        grads = torch.autograd.grad(out, [x, norm.weight], g)
        rows.append({"op": "rmsnorm", "impl": impl, "out_rel": rel(out, ref), "dx_rel": rel(grads[0], ref_grads[0]),
                     "dw_rel": rel(grads[1], ref_grads[1]), "saved_bytes_per_token": kept / tokens,
                     "fwd_bwd_ms": timed(lambda: norm(x), [x, norm.weight])})
    return rows


def check_swiglu(tokens: int, inter: int) -> list[dict]:
    from lightning_ulysses.memory.swiglu import swiglu

    torch.manual_seed(0)
    a = torch.randn(tokens, inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn_like(a, requires_grad=True)
    g = torch.randn_like(a)
    ar, br = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    ref = F.silu(ar) * br
    ref_grads = torch.autograd.grad(ref, [ar, br], g.float())
    rows = []
    for impl in ("hf", "torch", "liger"):
        fn = (lambda: F.silu(a) * b) if impl == "hf" else (lambda impl=impl: swiglu(a, b, impl))
        out, kept = saved_tensor_bytes(fn)
        grads = torch.autograd.grad(out, [a, b], g)
        rows.append({"op": "swiglu", "impl": impl, "out_rel": rel(out, ref), "dx_rel": rel(grads[0], ref_grads[0]),
                     "dw_rel": rel(grads[1], ref_grads[1]), "saved_bytes_per_token": kept / tokens,
                     "fwd_bwd_ms": timed(fn, [a, b])})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--out", default="kernel_check.json")
    args = p.parse_args()
    rows = check_rmsnorm(args.tokens, args.hidden) + check_swiglu(args.tokens, args.intermediate)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "rows": rows}, f, indent=1)
    print(f"{torch.cuda.get_device_name()}, {args.tokens} tokens, bf16; errors relative to fp32 on the same inputs")
    print("| op | impl | out rel err | d input rel err | d weight / d up rel err | saved B/token | fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['impl']} | {r['out_rel']:.2e} | {r['dx_rel']:.2e} | {r['dw_rel']:.2e} | "
              f"{r['saved_bytes_per_token']:.0f} | {r['fwd_bwd_ms']:.2f} |")


if __name__ == "__main__":
    main()
