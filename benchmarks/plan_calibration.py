"""Activation memory and step time of every memory plan ``memory="auto"`` chooses from, on one GPU.

Llama-3.1-8B width (hidden 4096, MLP 14336, 32 q / 8 kv heads, vocab 128256), the given depth, random init, bf16,
sdpa, one sequence. Each plan (:data:`lightning_ulysses.memory.candidates.CANDIDATES`) is applied to the same model
through the trick plan the strategy uses; one forward+backward per (plan, length) after a warm-up step at the first
length. Recorded: peak allocated memory above the static part (weights + gradients), the step time, and the static
part itself, and the process's host memory peak. No optimizer (its state does not depend on the plan or the length). An OOM is recorded and skipped.

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


class HostPeak:
    """The process's resident memory, sampled every 20 ms in a thread: its peak during a step (offloaded layer inputs
    live in pinned host memory, which counts as resident once written)."""

    def __init__(self) -> None:
        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0, False

    def __enter__(self) -> "HostPeak":
        import threading

        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        import time

        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def step(model, seq: int) -> dict:
    """One forward+backward (``memory_ablation.step``), its activation peak (the peak above weights + gradients) and
    the process's host memory peak."""
    from memory_ablation import step as ablation_step

    with HostPeak() as host:
        r = ablation_step(model, seq)
    return {**r, "activation_gib": r["peak_gib"] - r["static_gib"], "host_peak_gib": host.peak / GiB,
            "host_start_gib": host.start / GiB}


def main() -> None:
    from lightning_ulysses.memory import apply_tricks, remove_tricks, tricks_from_flags
    from lightning_ulysses.memory.auto import Workload, candidates
    from lightning_ulysses.memory.candidates import CANDIDATES

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seqlens", type=int, nargs="+", default=[65536, 131072])
    p.add_argument("--plans", nargs="*", default=list(CANDIDATES),
                   help="names of memory.auto.candidates (e.g. 'save_attention[3]+offload', 'full+offload, keep 2')")
    p.add_argument("--out", default="calibration.json")
    args = p.parse_args()
    model = build(args.layers)
    plans = candidates(Workload.from_config(model.config, max(args.seqlens)))
    unknown = [name for name in args.plans if name not in plans]
    if unknown:
        raise SystemExit(f"unknown plan(s) {unknown}; the candidates at {args.layers} layers: {list(plans)}")
    runs = []
    for name in args.plans:
        tricks = tricks_from_flags(**plans[name]).resolve(True)
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
    print("| plan | seq | activation GiB | static GiB | step s | host peak GiB (start) |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        if r.get("oom"):
            print(f"| {r['plan']} | {r['seq']:,} | OOM | | |")
        else:
            print(f"| {r['plan']} | {r['seq']:,} | {r['activation_gib']:.2f} | {r['static_gib']:.2f} | {r['step_s']:.2f} "
                  f"| {r['host_peak_gib']:.1f} ({r['host_start_gib']:.1f}) |")


if __name__ == "__main__":
    main()
