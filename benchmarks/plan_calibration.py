"""Activation memory and step time of every memory plan ``memory="auto"`` chooses from, on one GPU.

Llama-3.1-8B width (hidden 4096, MLP 14336, 32 q / 8 kv heads, vocab 128256), the given depth, random init, bf16,
sdpa, one sequence. Each plan (:data:`lightning_ulysses.memory.candidates.CANDIDATES`) is applied to the same model
through the trick plan the strategy uses; one forward+backward per (plan, length) after a warm-up step at the first
length. Recorded: peak allocated memory above the static part (weights + gradients), the step time, and the static
part itself. No optimizer (its state does not depend on the plan or the length). An OOM is recorded and skipped.

    python benchmarks/plan_calibration.py --layers 4 --seqlens 65536 131072 --out cal4.json
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

GiB = 2**30


def build(layers: int):
    """The model of ``memory_ablation.py`` (next to this file) without its checkpointing: each plan sets its own."""
    from memory_ablation import build as ablation_model

    from lightning_ulysses.memory import GradientCheckpointing

    model = ablation_model(layers)
    GradientCheckpointing().remove(model)
    return model


def step(model, seq: int) -> dict:
    """One forward+backward (``memory_ablation.step``) and its activation peak: the peak above weights + gradients."""
    from memory_ablation import step as ablation_step

    r = ablation_step(model, seq)
    return {**r, "activation_gib": r["peak_gib"] - r["static_gib"]}


def main() -> None:
    from lightning_ulysses.memory import apply_tricks, remove_tricks, tricks_from_flags
    from lightning_ulysses.memory.candidates import CANDIDATES

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seqlens", type=int, nargs="+", default=[65536, 131072])
    p.add_argument("--plans", nargs="*", default=list(CANDIDATES))
    p.add_argument("--out", default="calibration.json")
    args = p.parse_args()
    model = build(args.layers)
    runs = []
    for name in args.plans:
        tricks = tricks_from_flags(**CANDIDATES[name]).resolve(True)
        apply_tricks(model, tricks)
        for i, seq in enumerate(args.seqlens):
            row = {"plan": name, "layers": args.layers, "seq": seq}
            try:
                if i == 0:
                    step(model, seq)  # warm-up: kernels, allocator, pinned host pool
                row.update(step(model, seq))
            except torch.OutOfMemoryError:
                row["oom"] = True
            print(json.dumps(row), flush=True)
            runs.append(row)
            if row.get("oom"):
                break  # longer lengths of this plan cannot fit either
        remove_tricks(model, tricks)
        for q in model.parameters():
            q.grad = None
        gc.collect()
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": runs}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}, 8B width, {args.layers} layers, bf16, fwd+bwd, no optimizer")
    print("| plan | seq | activation GiB | static GiB | step s |")
    print("|---|---|---|---|---|")
    for r in runs:
        if r.get("oom"):
            print(f"| {r['plan']} | {r['seq']:,} | OOM | | |")
        else:
            print(f"| {r['plan']} | {r['seq']:,} | {r['activation_gib']:.2f} | {r['static_gib']:.2f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
