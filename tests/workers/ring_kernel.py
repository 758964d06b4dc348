"""Multi-process worker: ring attention on the local shards equals causal SDPA on the full sequence.

Several cases per launch (process start-up dominates). Every rank builds the same full q/k/v and upstream
gradient (with ``packed``: per batch row its own sample boundaries), computes the single-process reference,
keeps its shard (contiguous or zigzag, as the data layer shards), runs ring attention over the world
and compares its output rows and its q/k/v gradient rows. Rank 0 writes the worst errors.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from lightning_ulysses.parallel.layout import exit_distributed
from lightning_ulysses.parallel.sharding import shard_token_index
from lightning_ulysses.parallel.ring import ring_attention


def main() -> None:
    """``ring_kernel.py CASES_JSON OUT_DIR``: every case (``{name: case}``) in turn; rank 0 writes ``<name>.json``."""
    cases, out_dir = json.loads(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    for name, case in cases.items():
        errs = check(case)
        if dist.get_rank() == 0:
            with open(f"{out_dir}/{name}.json", "w") as f:
                json.dump(errs, f)
    exit_distributed()


def check(case: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    b, h, hkv, s, d = case.get("batch", 2), case["heads"], case["kv_heads"], case["seq"], 8
    q = torch.randn(b, h, s, d, dtype=torch.float64).float()
    k = torch.randn(b, hkv, s, d)
    v = torch.randn(b, hkv, s, d)
    dout = torch.randn(b, h, s, d)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    segments = None
    if case.get("packed"):  # per batch row its own sample boundaries (also across shard borders)
        g = torch.Generator().manual_seed(7)
        cuts = [sorted(set(torch.randint(1, s, (case["packed"],), generator=g).tolist())) for _ in range(b)]
        segments = torch.stack([torch.bucketize(torch.arange(s), torch.tensor(c), right=True) for c in cuts])
        mask = (segments[:, None, :, None] == segments[:, None, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
        ref = torch.nn.functional.scaled_dot_product_attention(*ref_inputs, attn_mask=mask, enable_gqa=True)
    else:
        ref = torch.nn.functional.scaled_dot_product_attention(*ref_inputs, is_causal=True, enable_gqa=True)
    ref.backward(dout)

    idx = shard_token_index(s, world, world, case["zigzag"])[rank]
    local = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, group=dist.group.WORLD, zigzag=case["zigzag"], backend=case.get("backend", "auto"),
                         segments=segments)
    out.backward(dout[:, :, idx])

    errs = {
        "out": (out - ref[:, :, idx]).abs().max().item(),
        "dq": (local[0].grad - ref_inputs[0].grad[:, :, idx]).abs().max().item(),
        "dk": (local[1].grad - ref_inputs[1].grad[:, :, idx]).abs().max().item(),
        "dv": (local[2].grad - ref_inputs[2].grad[:, :, idx]).abs().max().item(),
    }
    t = torch.tensor(list(errs.values()))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(errs, t.tolist()))


if __name__ == "__main__":
    main()
