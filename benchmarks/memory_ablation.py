"""Memory ablation of the ALST stack on one GPU (SP=1): peak memory per token for each trick.

Llama-3.1-8B width (hidden 4096, MLP 14336, 32 q / 8 kv heads, vocab 128256), reduced depth, random
init, bf16, sdpa. Each configuration adds one trick to the previous one:

    ckpt          gradient checkpointing (non-reentrant), plain HF loss (full logits)
    +tiled_loss   lightning_ulysses tiled lm_head + CE (torch implementation)
    +offload      activation-checkpoint CPU offload
    +tiled_mlp    tiled MLP
    +rmsnorm      memory-efficient RMSNorm (input kept instead of an fp32 copy; Liger's kernel on CUDA)
    (+swiglu      memory-efficient SwiGLU, for runs without tiled MLP: --configs "+swiglu (untiled)")
    (+liger_loss  the same stack with Liger's fused linear CE instead of the torch tiles)
    (+tiled_attn  attention backward on query x key tiles: "full stack + tiled attention")

Measured: peak allocated memory of one forward+backward (after a warm-up step), the static part
(weights + gradients), and the slope between lengths (GiB per 1K tokens): the activation cost the
slope reveals is what limits the sequence length. No optimizer: its state does not depend on length.

    python benchmarks/memory_ablation.py --layers 4 --seqlens 16384 32768 65536 --out ablation.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch.nn.functional as F

GiB = 2**30
ATTN_TILE_TOKENS = 16384  # --attn-tile
FULL_STACK = {"liger_loss", "offload", "tiled_mlp", "rmsnorm", "swiglu", "tiled_attn"}


def build(layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1 << 21, rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.train()
    from lightning_ulysses.memory.activation_checkpoint import enable_gradient_checkpointing

    enable_gradient_checkpointing(model)
    return model


def trick_objects() -> dict:
    """Ablation names -> the package's MemoryTrick objects (applied in the strategy's one plan order)."""
    from lightning_ulysses import memory as m

    return {
        "tiled_attn": m.TiledAttentionBackward(ATTN_TILE_TOKENS),
        "rmsnorm": m.MemoryEfficientRMSNorm(),
        "tiled_loss": m.TiledLoss(impl="torch"),
        "liger_loss": m.TiledLoss(impl="liger"),
        "offload": m.ActivationOffload(),
        "tiled_mlp": m.TiledMLP(),
        "swiglu": m.MemoryEfficientSwiGLU(),
    }


def configure(model, tricks: set[str]) -> None:
    from lightning_ulysses.memory import TRICKS, GradientCheckpointing, apply_tricks

    for kind in TRICKS:  # every trick off but checkpointing (build() turned it on), then the chosen ones
        if kind is not GradientCheckpointing:
            kind().remove(model)
    objects = trick_objects()
    apply_tricks(model, [objects[name] for name in sorted(tricks)])


def step(model, seq: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")
    pos = torch.arange(seq, device="cuda").unsqueeze(0)
    for p in model.parameters():
        p.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    static = torch.cuda.memory_allocated()  # weights + gradients (+ nothing else once the graph is gone)
    del loss
    return {"peak_gib": peak / GiB, "start_gib": base / GiB, "static_gib": static / GiB, "step_s": dt}


def measure(model, tricks, seq, warmup: bool = True) -> dict:
    configure(model, tricks)
    try:
        if warmup:
            step(model, seq)  # warm-up (allocator, kernels, pinned pool)
        return step(model, seq)
    except torch.OutOfMemoryError:
        failure = {"oom": True}
    except Exception as e:  # report and go on with the next configuration
        failure = {"error": repr(e)[:300]}
    for p in model.parameters():
        p.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    return failure


def check_loss_grads() -> list[dict]:
    """bf16 on GPU: tiled (torch) and Liger loss vs plain CE, value and gradient of hidden and lm_head."""
    from lightning_ulysses.memory.tiled_loss import linear_cross_entropy_sum

    torch.manual_seed(0)
    n, h, v = 4096, 4096, 128256
    x = (torch.randn(n, h, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda") * 0.02).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda")
    y[::7] = -100
    scale = 1.0 / int((y != -100).sum())
    ref = F.cross_entropy(F.linear(x, w).float(), y, ignore_index=-100, reduction="sum") * scale
    gx_ref, gw_ref = torch.autograd.grad(ref, [x, w])
    rows = []
    for impl in ("torch", "liger"):
        try:
            out = linear_cross_entropy_sum(x, w, None, y, tile_tokens=1024, impl=impl) * scale
        except Exception as e:  # liger missing
            rows.append({"impl": impl, "error": repr(e)[:200]})
            continue
        gx, gw = torch.autograd.grad(out, [x, w])
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
        rows.append({"impl": impl, "loss_abs_err": abs(float(out) - float(ref)), "grad_hidden_rel": rel(gx, gx_ref),
                     "grad_lm_head_rel": rel(gw, gw_ref)})
    return rows


def main() -> None:
    global ATTN_TILE_TOKENS
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seqlens", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--long", type=int, nargs="*", default=[131072, 262144], help="extra lengths for --long-config")
    p.add_argument("--long-config", default="+rmsnorm")
    p.add_argument("--depth-check", type=int, default=8, help="layers for the per-layer growth check (0: skip)")
    p.add_argument("--configs", nargs="*", default=None, help="run only these configurations (names as printed)")
    p.add_argument("--no-warmup", action="store_true", help="measure the first step (long single runs)")
    p.add_argument("--attn-tile", type=int, default=16384, help="tiled attention tile tokens")
    p.add_argument("--out", default="ablation.json")
    args = p.parse_args()
    ATTN_TILE_TOKENS = args.attn_tile
    import lightning_ulysses  # noqa: F401  (allocator default)

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
               "loss_check": check_loss_grads(), "runs": []}
    configs = [
        ("ckpt", set()),
        ("+tiled_loss", {"tiled_loss"}),
        ("+offload", {"tiled_loss", "offload"}),
        ("+tiled_mlp", {"tiled_loss", "offload", "tiled_mlp"}),
        ("+rmsnorm", {"tiled_loss", "offload", "tiled_mlp", "rmsnorm"}),
        ("full stack, liger loss", {"liger_loss", "offload", "tiled_mlp", "rmsnorm"}),
        ("+swiglu (untiled)", {"tiled_loss", "offload", "rmsnorm", "swiglu"}),
        ("full stack, liger loss, swiglu", FULL_STACK - {"tiled_attn"}),
        ("full stack + tiled attention", FULL_STACK),
    ]
    if args.configs:
        configs = [c for c in configs if c[0] in args.configs]
    model = build(args.layers)
    for name, tricks in configs:
        lengths = args.seqlens + (args.long if name == args.long_config else [])
        for seq in lengths:
            r = {"config": name, "layers": args.layers, "seq": seq, **measure(model, tricks, seq, not args.no_warmup)}
            print(json.dumps(r), flush=True)
            results["runs"].append(r)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if args.depth_check:
        model = build(args.depth_check)
        for name, tricks in configs[-1:]:
            seq = args.seqlens[-1]
            r = {"config": name, "layers": args.depth_check, "seq": seq, **measure(model, tricks, seq)}
            print(json.dumps(r), flush=True)
            results["runs"].append(r)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    report(results)


def report(results: dict) -> None:
    print(f"\n{results['device']}, torch {results['torch']}; Llama-3.1-8B width, bf16, fwd+bwd, no optimizer")
    for row in results["loss_check"]:
        print("loss check:", row)
    print("| config | layers | seq | peak GiB | static GiB | activation GiB | GiB / 1K tok (slope) | step s |")
    print("|---|---|---|---|---|---|---|---|")
    prev: dict = {}
    for r in results["runs"]:
        key = (r["config"], r["layers"])
        if r.get("oom") or r.get("error"):
            print(f"| {r['config']} | {r['layers']} | {r['seq']} | {'OOM' if r.get('oom') else r['error'][:60]} | | | | |")
            continue
        act = r["peak_gib"] - r["static_gib"]
        slope = ""
        if key in prev:
            s0, a0 = prev[key]
            slope = f"{(act - a0) / ((r['seq'] - s0) / 1024):.4f}"
        prev[key] = (r["seq"], act)
        print(f"| {r['config']} | {r['layers']} | {r['seq']} | {r['peak_gib']:.2f} | {r['static_gib']:.2f} | {act:.2f} | {slope} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
