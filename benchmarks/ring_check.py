"""Ring attention vs causal SDPA on the full sequence, per block kernel, on the current device.

    torchrun --nproc_per_node=2 benchmarks/ring_check.py --seq 16384 --backends cudnn flash

Every rank builds the same q/k/v (GQA), computes the reference (forward+backward) on the whole
sequence, runs ring attention on its zigzag shard and reports the max error (bf16 on CUDA) and the
ring's forward+backward time next to the full-sequence SDPA time divided by the ring size.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from lightning_ulysses.parallel.sharding import shard_token_index
from lightning_ulysses.parallel.ring import ring_attention


def timed(fn, reps: int = 3) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=["auto"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = lambda h: (1, h, args.seq, args.head_dim)  # noqa: E731
    q, k, v, dout = (torch.randn(shape(h), generator=g).to(device, dtype)
                     for h in (args.heads, args.kv_heads, args.kv_heads, args.heads))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=True)
    ref.backward(dout)

    def full_sdpa():
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.nn.functional.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=True).backward(dout)

    idx = shard_token_index(args.seq, world, world, True)[rank].to(device)
    rows = []
    for backend in args.backends:
        local = [t.index_select(2, idx).clone().requires_grad_() for t in (q, k, v)]
        try:
            out = ring_attention(*local, group=dist.group.WORLD, backend=backend)
            out.backward(dout.index_select(2, idx))
            errs = [(out - ref.index_select(2, idx)).abs().max().item()] + [
                (a.grad - b.grad.index_select(2, idx)).abs().max().item() for a, b in zip(local, ref_in)]

            def ring_step():
                x = [t.detach().clone().requires_grad_() for t in local]
                ring_attention(*x, group=dist.group.WORLD, backend=backend).backward(dout.index_select(2, idx))

            t = timed(ring_step)
            err = torch.tensor(errs, device=device)
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            rows.append({"backend": backend, "max_err_out_dq_dk_dv": err.tolist(), "ring_fwd_bwd_s": t})
        except Exception as e:  # report, do not crash: the next backend may work
            rows.append({"backend": backend, "error": repr(e)[:400]})
    t_full = timed(full_sdpa)
    if rank == 0:
        result = {"seq": args.seq, "world": world, "dtype": str(dtype), "full_sdpa_fwd_bwd_s": t_full,
                  "full_sdpa_per_rank_s": t_full / world, "rows": rows}
        print(json.dumps(result), flush=True)
        if args.out:
            json.dump(result, open(args.out, "w"), indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
