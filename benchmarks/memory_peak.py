"""What is live on the GPU at the peak of one training step, grouped by where it was allocated.

Records the CUDA caching allocator's trace for one forward+backward (after a warm-up step), replays
it to find the moment of maximum allocated memory, and lists the tensors alive at that moment by
allocation site (first frame in transformers / lightning_ulysses / torch.nn), in bytes per token.

    python benchmarks/memory_peak.py --layers 2 --seq 32768 --tricks tiled_loss offload tiled_mlp rmsnorm
"""

from __future__ import annotations

import argparse
import collections
import json
from typing import Any

import torch

from benchmarks.memory_ablation import GiB, build, configure


def site(frames: list[dict]) -> str:
    """The innermost frame in model/library code (frames come innermost first)."""
    for keep in (("lightning_ulysses/", "transformers/", "deepspeed/", "lightning/", "benchmarks/"),
                 ("torch/nn/", "torch/autograd/", "torch/utils/", "torch/optim/")):
        for f in frames:
            name = f.get("filename", "")
            if any(k in name for k in keep):
                return f"{name.split('site-packages/')[-1].split('/work/')[-1]}:{f.get('line')} {f.get('name')}"
    return "<autograd engine / other>"


def replay(trace: list[dict], stop: int = -1) -> tuple[int, int, dict[int, dict]]:
    """Live allocations (made during the recording) after event ``stop``; also the peak and its index."""
    live: dict[int, dict] = {}
    total = peak = peak_at = 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > peak:
                peak, peak_at = total, i
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
        if i == stop:
            break
    return peak, peak_at, live


def frame_text(f: dict) -> str:
    return f"{f.get('filename', '').split('site-packages/')[-1].split('/work/')[-1]}:{f.get('line')} {f.get('name')}"


def peak_summary(trace: list[dict], top: int = 20) -> dict:
    """The peak of a recorded allocator trace: its height over what was live when recording began, the live
    allocations at that moment grouped by :func:`site`, the Python stack of the allocation that made it, and
    the sizes of the blocks no library frame claims (autograd-engine buffers: gradients in flight)."""
    peak, peak_at, _ = replay(trace)
    _, _, live = replay(trace, stop=peak_at)
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for ev in live.values():
        g = groups[site(ev.get("frames", []))]
        g[0] += ev["size"]
        g[1] += 1
    rows = sorted(({"site": k, "bytes": v[0], "count": v[1]} for k, v in groups.items()), key=lambda r: -r["bytes"])
    unattributed = collections.Counter(ev["size"] for ev in live.values()
                                       if site(ev.get("frames", [])) == "<autograd engine / other>")
    at_peak = [frame_text(f) for f in trace[peak_at].get("frames", [])[:12]] if trace else []
    return {"peak_in_step": peak, "rows": rows[:top], "at_peak": at_peak,
            "unattributed_sizes": dict(unattributed.most_common(top))}


def peak_profile(step: int) -> Any:
    """A callback recording the CUDA allocator's trace over training step ``step`` and keeping what was live at its
    peak, by allocation site (:func:`peak_summary`) in ``.summary``; the Lightning step count starts at 0."""
    return PeakProfile(step, echo=False)


try:
    import lightning.pytorch as _pl

    _Callback: Any = _pl.Callback
except ImportError:  # the plain-model script above needs no Lightning
    _Callback = object


class PeakProfile(_Callback):
    """:func:`peak_profile` as a callback class, for the CLI: ``--trainer.callbacks+=benchmarks.memory_peak.PeakProfile
    --trainer.callbacks.init_args.step=1``; prints the table (:func:`print_profile`) after that step (``echo``) and
    writes ``out`` (JSON) when given. ``until="backward"`` ends the recording before the optimizer step (a fully
    trained model's step peaks there, in ZeRO's fp32 gradient partitions, hiding the backward's working set)."""

    def __init__(self, step: int = 1, out: str = "", top: int = 15, echo: bool = True, until: str = "step") -> None:
        if until not in ("step", "backward"):
            raise ValueError(f"until must be 'step' or 'backward', got {until!r}.")
        self.step, self.out, self.top, self.echo, self.until = step, out, top, echo, until
        self.summary: dict = {}
        self.recording = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            # stacks of allocations only: collecting a Python stack on a free while checkpointing's early-stop
            # exception unwinds through a custom autograd Function (the tiled MLP's recompute) loses that exception
            # ("SystemError: ... returned NULL without setting an exception")
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python", context="alloc")
            self.recording = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.recording and self.until == "backward":
            self._finish(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.recording:
            self._finish(trainer)

    def _finish(self, trainer) -> None:
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        self.recording = False
        self.summary = {**peak_summary(snap["device_traces"][0], top=self.top), "live_at_start": self.base}
        if trainer.is_global_zero and self.echo:
            print_profile(f"step {self.step} (until the {self.until}'s end)", self.summary)
        if trainer.is_global_zero and self.out:
            with open(self.out, "w") as f:
                json.dump(self.summary, f, indent=1)


def print_profile(title: str, summary: dict) -> None:
    """One :func:`peak_summary` as a markdown table."""
    print(f"\n{title}: live at the step's peak ({summary['peak_in_step'] / GiB:.2f} GiB allocated during the step, "
          f"{summary.get('live_at_start', 0) / GiB:.2f} GiB live when it began)")
    print("| allocation site | GiB | tensors |\n|---|---|---|")
    for row in summary["rows"]:
        print(f"| {row['site']} | {row['bytes'] / GiB:.3f} | {row['count']} |")
    if summary.get("at_peak"):
        print("allocation that made the peak: " + " <- ".join(summary["at_peak"][:6]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--tricks", nargs="*", default=["tiled_loss", "offload", "tiled_mlp", "rmsnorm"])
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default="peak.json")
    args = p.parse_args()
    import lightning_ulysses  # noqa: F401

    model = build(args.layers)
    configure(model, set(args.tricks))
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda")
    pos = torch.arange(args.seq, device="cuda").unsqueeze(0)

    def step():
        for prm in model.parameters():
            prm.grad = None
        # early stop off: with it, this script (only) hit torch 2.11's lost-exception SystemError when the
        # recompute stops inside a custom autograd Function (see model_utils.checkpoint_kwargs); no ZeRO here
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
            loss.backward()

    step()
    for prm in model.parameters():
        prm.grad = None
    torch.cuda.synchronize()
    static_before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python", context="alloc")
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    summary = peak_summary(snap["device_traces"][0], args.top)
    peak_in_step, rows, at_peak = summary["peak_in_step"], summary["rows"], summary["at_peak"]
    per_tok = lambda b: b / args.seq  # noqa: E731
    print(f"{torch.cuda.get_device_name()}; {args.layers} layers, {args.seq} tokens, tricks {args.tricks}")
    print(f"allocated before the step (weights, no grads): {static_before / GiB:.2f} GiB; "
          f"allocated during the step at its peak: {peak_in_step / GiB:.2f} GiB = {per_tok(peak_in_step) / 1024:.1f} KiB/token")
    print("| allocation site | live GiB at peak | KiB / token | tensors |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['site']} | {r['bytes'] / GiB:.3f} | {per_tok(r['bytes']) / 1024:.1f} | {r['count']} |")
    print("peak allocation made at:\n  " + "\n  ".join(at_peak))
    # unattributed sizes in units of one bf16 [tokens, hidden] activation (the sizes name the tensors)
    unit = args.seq * model.config.hidden_size * 2
    sizes = collections.Counter()
    for size, n in summary["unattributed_sizes"].items():
        sizes[round(size / unit, 3)] += n
    print("unattributed live blocks (size in bf16 [tokens, hidden] units: count):",
          ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:12]))
    with open(args.out, "w") as f:
        json.dump({"at_peak": at_peak, "unattributed_sizes": {str(k): v for k, v in sizes.items()}, "seq": args.seq, "layers": args.layers, "tricks": args.tricks, "static_before": static_before,
                   "peak_in_step": peak_in_step, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
