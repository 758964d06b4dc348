"""What packed rows cost inside ring attention, on one GPU: the local work of one ring rank.

A ring rank's attention with packed rows works per sample run of each (query rows, K/V block) pair
(:mod:`lightning_ulysses.parallel.ring`; short runs of the causal block batched per padded length). Samples are
contiguous, so only the causal step-0 block (the rank's own tokens) holds many runs; each later step adds at most a
sample or two that crosses a shard boundary. This
measures that step-0 work alone: ``ring_attention`` over a ring of one (no transfer) with K equal samples in the
local ``S`` tokens, forward + backward, against causal SDPA over ``S`` unpacked (the cost of one document) and the
SP=1/Ulysses packed path (:func:`~lightning_ulysses.kernels.tiled.packed_causal_attention`, short samples grouped
into masked calls of up to 2,048 tokens). K samples hold 1/K of the attention work, so a packed rank should not be
slower than an unpacked one.

    python benchmarks/ring_packed.py [--tokens 32768] [--samples 1 16 128 1024] [--heads 32 --kv-heads 8 --head-dim 128]

Prints a table (ms per forward + backward, median of --repeat after a warm-up) and writes --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lightning_ulysses.kernels.tiled import packed_causal_attention, segment_bounds
from lightning_ulysses.parallel.ring import RingGroup, ring_attention


def timed(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768, help="local tokens of one ring rank")
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 16, 128, 1024])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="ring_packed.json")
    args = ap.parse_args()
    dev, s = torch.device("cuda"), args.tokens
    torch.manual_seed(0)
    q = torch.randn(1, args.heads, s, args.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, args.kv_heads, s, args.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    dout = torch.randn_like(q)
    ring = RingGroup(group=None, size=1, rank=0, next_rank=0, prev_rank=0)  # a ring of one: nothing travels

    def step(attn):
        def run():
            q.grad = k.grad = v.grad = None
            attn().backward(dout)
        return run

    rows = [{"run": "sdpa causal, one document", "samples": 1,
             "ms": timed(step(lambda: torch.nn.functional.scaled_dot_product_attention(
                 q, k, v, is_causal=True, enable_gqa=True)), args.repeat)}]
    for n in args.samples:
        segments = (torch.arange(s, device=dev) * n // s)[None]  # n samples of s/n tokens
        bounds = segment_bounds(segments)
        with torch.no_grad():  # the two paths must agree (bf16 kernels: to rounding)
            diff = float((ring_attention(q, k, v, ring, segments=segments).float()
                          - packed_causal_attention(q, k, v, bounds).float()).abs().max())
        for name, attn in (("ring, packed", lambda: ring_attention(q, k, v, ring, segments=segments)),
                           ("SP=1 packed (grouped)", lambda: packed_causal_attention(q, k, v, bounds))):
            torch.cuda.reset_peak_memory_stats()
            ms = timed(step(attn), args.repeat)
            rows.append({"run": name, "samples": n, "ms": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                         "max_abs_diff_ring_vs_sp1": diff})
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"tokens": s, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                   "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"| run ({s} local tokens, {args.heads}/{args.kv_heads} heads x {args.head_dim}) | samples | fwd+bwd ms | "
          f"vs one document | max abs diff ring vs SP=1 |\n|---|---|---|---|---|")
    base = rows[0]["ms"]
    for r in rows:
        print(f"| {r['run']} | {r['samples']} | {r['ms']:.1f} | {r['ms'] / base:.2f}x | {r.get('max_abs_diff_ring_vs_sp1', '')} |")


if __name__ == "__main__":
    main()
