"""DPO with a frozen reference vs SFT on the same rows, and the distillation divergence tiled vs whole, on one GPU.

Llama-3.1-8B width (hidden 4096, MLP 14336, 32 q / 8 kv heads, vocab 128256), ``--layers`` deep, random init, bf16,
ZeRO-3, ``memory="auto"`` (it counts the reference's weights). Each row is one preference pair packed whole: a
``--prompt``-token prompt with the chosen completion, then the same prompt with the rejected one, ``--seq-len`` tokens
in all (what ``PreferenceDataModule`` builds with ``packing="none"``). SFT trains a ``CausalLMModule`` on the very same
rows (both completions labelled), so the difference is the reference's forward and the log-prob sums.

The distillation part times ``tiled_distillation_sums`` (student and teacher lm_heads of the same width) forward +
backward at each ``--distill-tokens`` length, in ``--tile``-token tiles and whole (one tile: both ``[S, V]`` logits
exist at once, as a plain implementation has them), and records the peak memory above the inputs.

Each fit runs in its own process (this script, once per mode and length): a finished fit's DeepSpeed engine and
optimizer state stay in GPU memory for the rest of the process (~30 GiB at 4 layers of this width), so a second fit in
one process would measure on top of the first (the 2026-12-05 "packed rows" figures did). Likewise each distillation
length runs alone with ``--seq-lens`` empty.

    python benchmarks/preference_throughput.py --layers 4 --seq-lens 65536 131072 --distill-tokens 16384 32768
    python benchmarks/preference_throughput.py --seq-lens 65536 --modes sft_one_document sft --distill-tokens \
        --memory-profile      # what is live at the peak, by allocation site (needs the repository root on PYTHONPATH)
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

GiB = 2**30
WIDTH = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=1 << 20)


def pair_rows(seq: int, prompt: int, rows: int, vocab: int) -> list[dict]:
    """``rows`` rows of one packed pair each: prompt + chosen, prompt + rejected, ``seq`` tokens (prompt masked)."""
    from lightning_ulysses.data.packing import _row

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(rows):
        p = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        parts = []
        for n in (seq // 2 - prompt, seq - seq // 2 - prompt):
            ids = p + torch.randint(0, vocab, (n,), generator=g).tolist()
            parts.append((ids, [-100] * prompt + ids[prompt:]))
        out.append(_row(parts, None, 0))
    return out


def fit(mode: str, seq: int, args) -> dict:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_ulysses import CausalLMModule, PreferenceModule, UlyssesDeepSpeedStrategy
    from lightning_ulysses.data.modules import RowsDataset
    from lightning_ulysses.lightning.callbacks import SequenceThroughput

    model = {**WIDTH, "num_hidden_layers": args.layers}
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-6, fused=True)  # noqa: E731
    module = (PreferenceModule(model, loss_type="sigmoid", beta=0.1, attn_implementation="sdpa", optimizer=optimizer)
              if mode == "dpo" else CausalLMModule(model, attn_implementation="sdpa", optimizer=optimizer))
    rows = pair_rows(seq, args.prompt, args.steps, WIDTH["vocab_size"])
    if mode == "sft_one_document":  # the same tokens as one sequence (positions never restart): packing's share
        rows = [dict(r, position_ids=list(range(len(r["input_ids"])))) for r in rows]
    throughput = SequenceThroughput(warmup_steps=1)
    from lightning_ulysses.memory.candidates import CANDIDATES

    plan = {"memory": "auto", "max_seq_len": seq} if args.plan == "auto" else CANDIDATES[args.plan]
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=1, stage=3, pad_to_multiple_of=1024, **plan)
    profile = None
    if args.memory_profile:  # needs the repository root on PYTHONPATH
        from benchmarks.memory_peak import peak_profile

        profile = peak_profile(args.steps - 1)
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", strategy=strategy,
                         max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[throughput] + ([profile] if profile else []))
    rows = RowsDataset(rows)
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, DataLoader(rows, batch_size=1))
    steady = throughput.history[1:] or throughput.history
    step_s = sorted(m["throughput/step_s"] for m in steady)[len(steady) // 2]
    chosen = strategy.memory_estimate  # the estimate memory="auto" chose (None for a pinned plan)
    result = {"mode": mode, "seq": seq, "layers": args.layers, "step_s": step_s, "tokens_per_s": seq / step_s,
              "peak_gib": max(m["memory/peak_allocated_gib"] for m in steady),
              "plan": chosen.name if chosen is not None else args.plan,
              "predicted_gib": chosen.gpu_peak_gib if chosen is not None else None}
    if profile is not None:
        result["profile"] = profile.summary
    del trainer, module
    gc.collect()
    torch.cuda.empty_cache()
    return result


def distill(tokens: int, tile: int) -> dict:
    from lightning_ulysses.alignment.distillation import tiled_distillation_sums

    h, v = WIDTH["hidden_size"], WIDTH["vocab_size"]
    g = torch.Generator(device="cuda").manual_seed(0)
    student = torch.nn.Linear(h, v, bias=False, device="cuda", dtype=torch.bfloat16)
    teacher = torch.nn.Linear(h, v, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    s_h = torch.randn(1, tokens, h, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    t_h = torch.randn(1, tokens, h, device="cuda", dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, v, (1, tokens), device="cuda", generator=g)
    row = {"tokens": tokens, "tile": tile}
    for _ in range(2):  # the second is timed (kernels and allocator warm)
        student.weight.grad = s_h.grad = None
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            div, ce = tiled_distillation_sums(s_h, t_h, labels, student, teacher, tile_tokens=tile)
            (div + ce).backward()
        except torch.OutOfMemoryError:
            return {**row, "oom": True}
        torch.cuda.synchronize()
        row.update(step_s=time.perf_counter() - t0, peak_above_inputs_gib=(torch.cuda.max_memory_allocated() - base) / GiB)
        del div, ce
    return row


def _fit_in_own_process(mode: str, seq: int, args) -> dict:
    """:func:`fit` in a fresh interpreter (this script with one mode and length): its result, or OOM."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/run.json"
        cmd = [sys.executable, __file__, "--layers", str(args.layers), "--seq-lens", str(seq), "--modes", mode,
               "--prompt", str(args.prompt), "--steps", str(args.steps), "--plan", args.plan, "--distill-tokens",
               "--out", out] + (["--memory-profile"] if args.memory_profile else [])
        proc = subprocess.run(cmd)
        try:
            with open(out) as f:
                return json.load(f)["runs"][0]
        except (OSError, ValueError, IndexError):
            return {"mode": mode, "seq": seq, "layers": args.layers, "failed": proc.returncode}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-lens", type=int, nargs="*", default=[65536, 131072])
    p.add_argument("--modes", nargs="+", default=["dpo", "sft"], help="dpo, sft, sft_one_document")
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens of each pair")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--distill-tokens", type=int, nargs="*", default=[16384, 32768])
    p.add_argument("--tile", type=int, default=2048)
    p.add_argument("--plan", default="auto", help="auto, or a candidate of lightning_ulysses.memory.candidates")
    p.add_argument("--memory-profile", action="store_true",
                   help="record the allocator over the last step of each fit and print what is live at its peak")
    p.add_argument("--out", default="preference_throughput.json")
    args = p.parse_args()
    runs, distills = [], []
    fits = [(seq, mode) for seq in args.seq_lens for mode in args.modes]
    for seq, mode in fits:
        if len(fits) > 1 or args.distill_tokens:  # one process per fit (module docstring)
            runs.append(_fit_in_own_process(mode, seq, args))
        else:
            try:
                runs.append(fit(mode, seq, args))
            except torch.OutOfMemoryError:
                runs.append({"mode": mode, "seq": seq, "layers": args.layers, "oom": True})
        print(json.dumps(runs[-1]), flush=True)
    for tokens in args.distill_tokens:
        for tile in (args.tile, tokens):
            distills.append(distill(tokens, tile))
            print(json.dumps(distills[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "runs": runs, "distillation": distills}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}, 8B width, {args.layers} layers, ZeRO-3 bf16, memory=auto, one pair per row")
    print("| run | tokens per row | plan | tokens/s | step s | peak GiB | predicted GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        if "failed" in r:
            print(f"| {r['mode']} | {r['seq']:,} | | failed (exit {r['failed']}) | | | |")
        elif r.get("oom"):
            print(f"| {r['mode']} | {r['seq']:,} | | OOM | | | |")
        else:
            pred = f"{r['predicted_gib']:.2f}" if r["predicted_gib"] is not None else ""
            print(f"| {r['mode']} | {r['seq']:,} | {r['plan']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} "
                  f"| {r['peak_gib']:.2f} | {pred} |")
    for r in runs:
        if r.get("profile"):
            from benchmarks.memory_peak import print_profile

            print_profile(f"{r['mode']} at {r['seq']:,} tokens", r["profile"])
    print("\n| distillation tokens | tile | fwd+bwd s | peak above inputs GiB |")
    print("|---|---|---|---|")
    for r in distills:
        tile = "whole" if r["tile"] >= r["tokens"] else f"{r['tile']:,}"
        cell = "OOM | " if r.get("oom") else f"{r['step_s']:.3f} | {r['peak_above_inputs_gib']:.2f}"
        print(f"| {r['tokens']:,} | {tile} | {cell} |")


if __name__ == "__main__":
    main()
