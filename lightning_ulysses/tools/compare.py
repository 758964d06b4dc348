"""``lightning-ulysses compare RUN_A RUN_B``: do two runs train the same?

The correctness recipe (ArcticTraining's, and the Ulysses+Ring example set's ``compare_runs``): train the same
samples once with sequence parallelism and gradient accumulation (SP=N, ``accumulate_grad_batches=N``) and once
with plain data parallelism (DP=N, no accumulation); every optimizer step sees the same samples, so the loss
curves must coincide. This reads the metric of both runs as Lightning's loggers wrote it, aligns the steps both
have, and reports the largest and mean absolute difference.

A run is a ``metrics.csv`` written by ``CSVLogger``, a TensorBoard event file, or a directory holding either
(searched recursively; the newest file wins). Exit status 0: mean |diff| <= ``--tol`` (and max |diff| <=
``--max-tol`` when given); 1: the runs differ; 2: a run could not be read.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


def _newest(paths: list[Path]) -> Optional[Path]:
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def _find_run_file(run: Path) -> Path:
    if run.is_file():
        return run
    if not run.is_dir():
        raise FileNotFoundError(f"{run} does not exist; pass a metrics.csv, a TensorBoard event file, or a log directory.")
    found = _newest(sorted(run.rglob("metrics.csv"))) or _newest(sorted(run.rglob("events.out.tfevents.*")))
    if found is None:
        raise FileNotFoundError(
            f"{run} holds no metrics.csv (CSVLogger) or events.out.tfevents.* (TensorBoardLogger); point to the run's "
            "log directory (e.g. lightning_logs/version_0)."
        )
    return found


def _read_csv(path: Path, metric: str) -> dict[int, float]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and metric not in rows[0]:
        raise KeyError(f"{path} has no column {metric!r}; columns: {sorted(rows[0])}. Pick one with --metric.")
    out: dict[int, float] = {}
    for row in rows:
        value = row.get(metric, "")
        if value not in ("", None) and row.get("step", "") != "":
            out[int(float(row["step"]))] = float(value)
    return out


def _read_tensorboard(path: Path, metric: str) -> dict[int, float]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Reading TensorBoard logs needs the tensorboard package: pip install tensorboard") from exc
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    if metric not in tags:
        raise KeyError(f"{path} has no scalar {metric!r}; scalars: {sorted(tags)}. Pick one with --metric.")
    return {int(e.step): float(e.value) for e in acc.Scalars(metric)}


def read_metric(run: str | Path, metric: str = "train_loss") -> dict[int, float]:
    """``{step: value}`` of ``metric`` in a run (see module docstring for what a run is)."""
    path = _find_run_file(Path(run))
    values = _read_csv(path, metric) if path.suffix == ".csv" else _read_tensorboard(path, metric)
    if not values:
        raise ValueError(f"{path} logged no value of {metric!r}.")
    return values


def compare_metrics(a: dict[int, float], b: dict[int, float]) -> dict[str, float]:
    """Steps both runs logged, with max and mean |a - b| over them."""
    steps = sorted(set(a) & set(b))
    if not steps:
        raise ValueError(
            f"The runs share no logged step (A: {min(a)}..{max(a)}, B: {min(b)}..{max(b)}); log both with the same "
            "log_every_n_steps."
        )
    diffs = [abs(a[s] - b[s]) for s in steps]
    return {
        "steps": len(steps),
        "first_step": steps[0],
        "last_step": steps[-1],
        "max_abs_diff": max(diffs),
        "mean_abs_diff": sum(diffs) / len(diffs),
    }


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'lightning-ulysses[plot]' (or pip install matplotlib)") from exc
    return plt


def plot_runs(a: dict[int, float], b: dict[int, float], labels: Sequence[str], metric: str, out: str | Path) -> None:
    plt = _pyplot()
    steps = sorted(set(a) & set(b))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot(sorted(a), [a[s] for s in sorted(a)], label=labels[0], lw=1.5)
    top.plot(sorted(b), [b[s] for s in sorted(b)], label=labels[1], lw=1.0, ls="--")
    top.set_ylabel(metric)
    top.legend()
    bottom.plot(steps, [abs(a[s] - b[s]) for s in steps], color="tab:red", lw=1.0)
    bottom.set_ylabel(f"|diff|")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-ulysses compare",
        description="Compare one metric of two training runs step by step (e.g. SP=N with accumulation N vs DP=N).",
    )
    parser.add_argument("run_a", help="metrics.csv, TensorBoard event file, or a log directory")
    parser.add_argument("run_b")
    parser.add_argument("--metric", default="train_loss", help="logged metric to compare (default: train_loss)")
    parser.add_argument("--tol", type=float, default=0.005, help="pass when mean |diff| <= tol (default 0.005)")
    parser.add_argument("--max-tol", type=float, default=None, help="also require max |diff| <= this")
    parser.add_argument("--plot", default=None, help="write both curves and |diff| to this PNG")
    args = parser.parse_args(argv)
    try:
        if args.plot:
            _pyplot()  # before reading the runs: a missing plotting extra is one line, not a traceback after the verdict
        a = read_metric(args.run_a, args.metric)
        b = read_metric(args.run_b, args.metric)
        stats = compare_metrics(a, b)
    except (OSError, KeyError, ValueError, ImportError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    ok = stats["mean_abs_diff"] <= args.tol and (args.max_tol is None or stats["max_abs_diff"] <= args.max_tol)
    if any(math.isnan(v) for v in (stats["max_abs_diff"], stats["mean_abs_diff"])):
        ok = False
    print(
        f"{args.metric}: {stats['steps']} common steps ({stats['first_step']}..{stats['last_step']}); "
        f"max |diff| {stats['max_abs_diff']:.3e}, mean |diff| {stats['mean_abs_diff']:.3e} "
        f"(tol {args.tol:g}{'' if args.max_tol is None else f', max tol {args.max_tol:g}'}): {'PASS' if ok else 'FAIL'}"
    )
    if args.plot:
        plot_runs(a, b, (str(args.run_a), str(args.run_b)), args.metric, args.plot)
        print(f"plot: {args.plot}")
    return 0 if ok else 1


__all__ = ["compare_metrics", "main", "plot_runs", "read_metric"]
