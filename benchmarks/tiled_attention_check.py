"""Attention backward on GPU: the kernel's whole-sequence backward vs the tiled backward.

For Llama-3-8B attention at SP=1 (32 q / 8 kv heads, head dim 128, bf16, causal), per sequence length:
forward and backward time, and the backward's transient memory beyond its inputs and its dq/dk/dv
outputs (the workspace ``memory_peak.py`` finds at the peak of a long-sequence step), in units of one
bf16 ``[tokens, hidden]`` activation. At one length, the error of each against an fp32 reference.

    python benchmarks/tiled_attention_check.py --seqlens 65536 131072 262144 --tiles 8192 16384 32768

``--packed N`` adds the packed-row path (``packed_causal_attention``: N equal samples in the row, one kernel call
each) and the call a one-document row makes (``F.scaled_dot_product_attention`` with torch's own kernel choice), with
the inputs laid out as the model hands them over (``[b, s, h, d]`` transposed), and reports what each forward keeps
for backward beyond its output ("saved").

    python benchmarks/tiled_attention_check.py --seqlens 65536 --tiles --packed 2 --reps 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_ulysses.kernels.tiled import _native_gqa, packed_causal_attention, tiled_attention


def variants(tiles: list[int]) -> list[tuple[str, object]]:
    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return run

    out = [("sdpa cudnn (untiled)", sdpa(SDPBackend.CUDNN_ATTENTION)), ("sdpa flash (untiled)", sdpa(SDPBackend.FLASH_ATTENTION))]
    out += [(f"tiled {t // 1024}K (cudnn tiles)", (lambda t: lambda q, k, v: tiled_attention(q, k, v, tile_tokens=t))(t)) for t in tiles]
    return out


def packed_variants(samples: int) -> list[tuple[str, object]]:
    """The packed-row path with ``samples`` equal samples vs one document through torch's default SDPA choice."""
    def packed(q, k, v):
        s = q.shape[2]
        edges = [s * i // samples for i in range(samples + 1)]
        return packed_causal_attention(q, k, v, [list(zip(edges[:-1], edges[1:]))])

    def one_document(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return [("sdpa one document (torch's kernel)", one_document), (f"packed, {samples} samples", packed)]


def inputs(s: int, hq: int, hkv: int, seed: int = 0, model_layout: bool = False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if model_layout:  # [b, s, h, d] transposed to [b, h, s, d], as the attention layer hands q/k/v over
        mk = lambda h: torch.randn(1, s, h, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()  # noqa: E731
        q, k, v = mk(hq), mk(hkv), mk(hkv)
        leaves = (q, k, v)
        q, k, v = (t.transpose(1, 2) for t in leaves)
        return q, k, v, torch.randn(1, hq, s, 128, device="cuda", dtype=torch.bfloat16, generator=g), leaves
    mk = lambda h: torch.randn(1, h, s, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()  # noqa: E731
    q, k, v = mk(hq), mk(hkv), mk(hkv)
    return q, k, v, torch.randn(1, hq, s, 128, device="cuda", dtype=torch.bfloat16, generator=g), (q, k, v)


def measure(fn, s: int, hq: int, hkv: int, reps: int, model_layout: bool = False) -> dict:
    q, k, v, g, leaves = inputs(s, hq, hkv, model_layout=model_layout)
    unit = s * hq * 128 * 2
    fwd, bwd, extra, saved = [], [], 0, 0
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn(q, k, v)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        base = torch.cuda.memory_allocated()
        saved = base - before - out.numel() * out.element_size()  # what the forward keeps for backward
        torch.cuda.reset_peak_memory_stats()
        dq, dk, dv = torch.autograd.grad(out, list(leaves), g)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        outputs = sum(t.numel() * t.element_size() for t in (dq, dk, dv))
        extra = torch.cuda.max_memory_allocated() - base - outputs
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        del out, dq, dk, dv
    fwd, bwd = sorted(fwd[1:]), sorted(bwd[1:])  # first call: warm-up
    flops_fwd = 2 * 2 * s * s * hq * 128 / 2  # causal: half of QK^T and PV
    return {"fwd_ms": 1e3 * fwd[len(fwd) // 2], "bwd_ms": 1e3 * bwd[len(bwd) // 2], "extra_units": extra / unit,
            "saved_units": saved / unit,
            "extra_kib_per_token": extra / s / 1024,
            "fwd_bwd_tflops": 3.5 * flops_fwd / (fwd[len(fwd) // 2] + bwd[len(bwd) // 2]) / 1e12}


def accuracy(fns, s: int, hq: int, hkv: int) -> dict:
    q, k, v, g, _ = inputs(s, hq, hkv, seed=1)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    # fp32 reference: the memory-efficient kernel (fp32 math, O(s) memory; it takes no GQA, so expand)
    groups = hq // hkv
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        ref = F.scaled_dot_product_attention(qf, kf.repeat_interleave(groups, 1), vf.repeat_interleave(groups, 1), is_causal=True)
    ref_grads = torch.autograd.grad(ref, [qf, kf, vf], g.float())
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    rows = {}
    for name, fn in fns:
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, [q, k, v], g)
        rows[name] = {"out": rel(out, ref), **{n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)}}
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", type=int, nargs="+", default=[65536, 131072, 262144])
    p.add_argument("--tiles", type=int, nargs="*", default=[8192, 16384, 32768])
    p.add_argument("--accuracy-seq", type=int, default=16384)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--packed", type=int, help="also: the packed-row path with this many equal samples per row vs one "
                   "document, inputs in the model's layout")
    p.add_argument("--out", default="tiled_attention_check.json")
    args = p.parse_args()
    fns = variants(args.tiles)
    layouts = {name: False for name, _ in fns}
    if args.packed:
        extra = packed_variants(args.packed)
        fns += extra
        layouts.update({name: True for name, _ in extra})
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn_native_gqa": _native_gqa("cudnn", "cuda:0", torch.bfloat16),
           "flash_native_gqa": _native_gqa("flash", "cuda:0", torch.bfloat16),
           "accuracy": accuracy(variants(args.tiles), args.accuracy_seq, args.heads, args.kv_heads), "runs": []}
    print(json.dumps({k: res[k] for k in ("cudnn_native_gqa", "flash_native_gqa")}), flush=True)
    for s in args.seqlens:
        for name, fn in fns:
            try:
                r = {"variant": name, "seq": s, **measure(fn, s, args.heads, args.kv_heads, args.reps, layouts[name])}
            except (RuntimeError, torch.OutOfMemoryError) as e:
                r = {"variant": name, "seq": s, "error": str(e)[:160]}
            torch.cuda.empty_cache()
            print(json.dumps(r), flush=True)
            res["runs"].append(r)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{res['device']}, torch {res['torch']}; {args.heads} q / {args.kv_heads} kv heads, d 128, bf16, causal; "
          f"native GQA: cudnn {res['cudnn_native_gqa']}, flash {res['flash_native_gqa']}")
    print(f"errors vs fp32 at {args.accuracy_seq} tokens (relative norm): ")
    print("| variant | out | dq | dk | dv |\n|---|---|---|---|---|")
    for name, e in res["accuracy"].items():
        print(f"| {name} | {e['out']:.2e} | {e['dq']:.2e} | {e['dk']:.2e} | {e['dv']:.2e} |")
    print("| variant | seq | fwd ms | bwd ms | fwd+bwd TFLOPS | saved (units) | bwd transient (units) | KiB/token |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        if "error" in r:
            print(f"| {r['variant']} | {r['seq']} | {r['error'][:60]} | | | | | |")
        else:
            print(f"| {r['variant']} | {r['seq']} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | {r['fwd_bwd_tflops']:.0f} | "
                  f"{r['saved_units']:.3f} | {r['extra_units']:.3f} | {r['extra_kib_per_token']:.1f} |")


if __name__ == "__main__":
    main()
