"""Packed rows with ``attn_implementation="flash_attention_2"``, on one GPU with the real flash-attn.

1. Correctness: a 2-layer Llama (head dim 128, bf16) on a micro-batch of ``--rows`` packed rows of ``--tokens``
   tokens (samples of random length, position ids restarting at each) through the strategy's attention handler at
   sp=1 (:func:`lightning_ulysses.parallel.ulysses.apply_ulysses`: every row's samples go to flash-attn's varlen
   kernel as one ``cu_seqlens``), against a reference that runs every sample on its own with ``sdpa``: the loss
   (summed token cross-entropy over all samples / their target count) and every parameter's gradient. The same
   micro-batch through transformers alone shows what the handler prevents (with more than one row transformers
   runs the dense kernel, across samples).
2. Speed of the attention kernels alone, forward + backward, ``--kernel-tokens`` tokens of K equal samples: the
   varlen kernel vs flash-attn on one unpacked document and vs the sdpa packed path
   (:func:`lightning_ulysses.kernels.tiled.packed_causal_attention`). K samples hold 1/K of the attention work.

    python benchmarks/flash_packed.py [--tokens 16384 --rows 2] [--kernel-tokens 32768 --samples 1 16 128 1024]

Needs CUDA and flash-attn (head dim 128, bf16). Prints two tables; writes --out as JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from ring_packed import timed  # median ms of fn() after a warm-up (benchmarks/ is the script's directory)


def packed_batch(rows: int, tokens: int, vocab: int, seed: int = 0) -> tuple[dict, list[list[tuple[int, int]]]]:
    """``rows`` rows of ``tokens`` tokens, each cut into samples of 64-4,096 tokens; labels never cross a sample."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, tokens), generator=g)
    labels, positions, bounds = ids.clone(), torch.empty_like(ids), []
    for r in range(rows):
        row, start = [], 0
        while start < tokens:
            end = min(tokens, start + int(torch.randint(64, 4097, (1,), generator=g)))
            positions[r, start:end] = torch.arange(end - start)
            labels[r, start] = -100  # the previous sample's last token does not predict this one
            row.append((start, end))
            start = end
        bounds.append(row)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}, bounds


def loss_and_grads(model, batches: list[dict]) -> tuple[float, dict]:
    """Summed token cross-entropy over ``batches`` / their target count, and the gradients of that loss."""
    model.zero_grad(set_to_none=True)
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    value = 0.0
    for b in batches:
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), reduction="sum")
        (ce / total).backward()
        value += float(ce.detach()) / total
    return value, {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def correctness(args) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_ulysses.parallel.layout import ParallelLayout, ProcessGroups
    from lightning_ulysses.parallel.ulysses import apply_ulysses, remove_ulysses

    def build(attn: str):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                          num_attention_heads=16, num_key_value_heads=4, head_dim=128, max_position_embeddings=65536)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16).cuda().train()

    batch, bounds = packed_batch(args.rows, args.tokens, 32000)
    batch = {k: v.cuda() for k, v in batch.items()}
    samples = [{k: v[r : r + 1, a:b] for k, v in batch.items()} for r, row in enumerate(bounds) for a, b in row]
    ref_loss, ref_grads = loss_and_grads(build("sdpa"), samples)  # every sample alone

    flash = build("flash_attention_2")
    results = {"samples": len(samples), "rows": args.rows, "tokens": args.tokens}

    def compare(name: str, loss: float, grads: dict) -> None:
        diff = torch.cat([(grads[n] - ref_grads[n]).flatten() for n in ref_grads]).norm()
        norm = torch.cat([ref_grads[n].flatten() for n in ref_grads]).norm()
        results[name] = {"loss": loss, "loss_abs_err": abs(loss - ref_loss), "grad_rel_err": float(diff / norm)}

    apply_ulysses(flash, ProcessGroups.build(ParallelLayout(1, 1)))  # what the strategy applies at sp=1
    compare("ours (handler, varlen)", *loss_and_grads(flash, [batch]))
    remove_ulysses(flash)
    compare("transformers alone, all rows in one call", *loss_and_grads(flash, [batch]))
    compare("transformers alone, one row per call", *loss_and_grads(
        flash, [{k: v[r : r + 1] for k, v in batch.items()} for r in range(args.rows)]))
    results["reference_loss"] = ref_loss
    return results


def kernels(args) -> list[dict]:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    from lightning_ulysses.kernels.tiled import packed_causal_attention

    s, h, hk, d = args.kernel_tokens, args.heads, args.kv_heads, 128
    q = torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(s, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(s, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16)

    def run(fn):
        def step():
            q.grad = k.grad = v.grad = None
            fn().backward(grad)
        return step

    one_doc = timed(run(lambda: flash_attn_func(q[None], k[None], v[None], causal=True)[0]), args.repeat)
    rows = []
    for n in args.samples:
        size = s // n
        cu = torch.arange(0, s + 1, size, dtype=torch.int32, device="cuda")
        varlen = timed(run(lambda: flash_attn_varlen_func(q, k, v, cu, cu, size, size, causal=True)), args.repeat)
        bounds = [[(i * size, (i + 1) * size) for i in range(n)]]
        sdpa = timed(run(lambda: packed_causal_attention(q[None].transpose(1, 2), k[None].transpose(1, 2),
                                                         v[None].transpose(1, 2), bounds).transpose(1, 2)[0]),
                     args.repeat)
        rows.append({"samples": n, "flash_one_doc_ms": one_doc, "flash_varlen_ms": varlen, "sdpa_packed_ms": sdpa})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--kernel-tokens", type=int, default=32768)
    p.add_argument("--samples", type=int, nargs="+", default=[1, 16, 128, 1024])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default="flash_packed.json")
    args = p.parse_args()
    check = correctness(args)
    speed = kernels(args)
    with open(args.out, "w") as f:
        json.dump({"correctness": check, "kernels": speed}, f, indent=1)
    print(f"\n{check['rows']} rows x {check['tokens']} tokens, {check['samples']} samples, vs every sample alone "
          f"with sdpa (loss {check['reference_loss']:.5f})")
    print("| path | loss abs err | gradient rel err |\n|---|---|---|")
    for name, r in check.items():
        if isinstance(r, dict):
            print(f"| {name} | {r['loss_abs_err']:.2e} | {r['grad_rel_err']:.2e} |")
    print(f"\n{args.kernel_tokens} tokens, {args.heads}/{args.kv_heads} heads x 128, bf16, fwd+bwd ms (median)")
    print("| samples | flash, one document | flash varlen | sdpa packed path |\n|---|---|---|---|")
    for r in speed:
        print(f"| {r['samples']} | {r['flash_one_doc_ms']:.1f} | {r['flash_varlen_ms']:.1f} | {r['sdpa_packed_ms']:.1f} |")


if __name__ == "__main__":
    main()
