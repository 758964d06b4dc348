"""Multi-process worker: ring attention on the local shards equals causal SDPA on the full sequence.

Every rank builds the same full q/k/v and upstream gradient, computes the single-process reference,
keeps its shard (contiguous or zigzag, as the data layer shards), runs ring attention over the world
and compares its output rows and its q/k/v gradient rows. Rank 0 writes the worst errors.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from lightning_ulysses.parallel.sharding import shard_token_index
from lightning_ulysses.parallel.ring import ring_attention


def main() -> None:
    case = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    b, h, hkv, s, d = case.get("batch", 2), case["heads"], case["kv_heads"], case["seq"], 8
    q = torch.randn(b, h, s, d, dtype=torch.float64).float()
    k = torch.randn(b, hkv, s, d)
    v = torch.randn(b, hkv, s, d)
    dout = torch.randn(b, h, s, d)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_inputs, is_causal=True, enable_gqa=True)
    ref.backward(dout)

    idx = shard_token_index(s, world, world, case["zigzag"])[rank]
    local = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, group=dist.group.WORLD, zigzag=case["zigzag"], backend=case.get("backend", "auto"))
    out.backward(dout[:, :, idx])

    errs = {
        "out": (out - ref[:, :, idx]).abs().max().item(),
        "dq": (local[0].grad - ref_inputs[0].grad[:, :, idx]).abs().max().item(),
        "dk": (local[1].grad - ref_inputs[1].grad[:, :, idx]).abs().max().item(),
        "dv": (local[2].grad - ref_inputs[2].grad[:, :, idx]).abs().max().item(),
    }
    t = torch.tensor(list(errs.values()))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(dict(zip(errs, t.tolist())), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
