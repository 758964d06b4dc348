"""``lightning-ulysses compare``: the correctness recipe as a command (issue #14).

The recipe itself runs here: SP=2 with accumulate_grad_batches=2 against Lightning's own DDP over 2 processes
on the same samples, from the shipped configs, through the CLI; ``compare`` must pass on them and fail on a
run that differs.
"""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from lightning_ulysses.tools.compare import compare_metrics, main, read_metric
from tests.harness import ROOT, worker_env


def _write_csv(path, values, metric="train_loss"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", metric, "val_loss"])
        for step, v in values.items():
            w.writerow([0, step, v, ""])
            w.writerow([0, step, "", 1.0])  # another metric's row: skipped
    return path


def test_compare_reads_csv_runs_aligns_steps_and_sets_exit_status(tmp_path, capsys) -> None:
    a = _write_csv(tmp_path / "a" / "version_0" / "metrics.csv", {0: 5.0, 1: 4.0, 2: 3.0})
    b = _write_csv(tmp_path / "b" / "metrics.csv", {1: 4.001, 2: 3.003, 3: 2.0})
    assert read_metric(tmp_path / "a") == {0: 5.0, 1: 4.0, 2: 3.0}  # directory: searched recursively
    stats = compare_metrics(read_metric(a), read_metric(b))
    assert stats["steps"] == 2 and stats["max_abs_diff"] == pytest.approx(0.003) and stats["mean_abs_diff"] == pytest.approx(0.002)
    assert main([str(a), str(b), "--tol", "0.005"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main([str(a), str(b), "--tol", "0.005", "--max-tol", "0.001"]) == 1
    assert main([str(a), str(b), "--tol", "0.001"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main([str(a), str(tmp_path / "missing")]) == 2
    assert main([str(a), str(b), "--metric", "nope"]) == 2
    assert "Pick one with --metric" in capsys.readouterr().err


def test_compare_reads_tensorboard_and_plots(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    for name, shift in (("x", 0.0), ("y", 0.5)):
        logger = TensorBoardLogger(tmp_path, name=name, version=0)
        for step in range(4):
            logger.log_metrics({"train_loss": 4.0 - step + shift}, step=step)
        logger.finalize("success")
    assert read_metric(tmp_path / "x") == {0: 4.0, 1: 3.0, 2: 2.0, 3: 1.0}
    plot = tmp_path / "curves.png"
    assert main([str(tmp_path / "x"), str(tmp_path / "y"), "--plot", str(plot)]) == 1  # 0.5 apart
    assert plot.stat().st_size > 1000


def _fit(config: str, tmp_path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "lightning_ulysses", "fit", "--config", str(ROOT / "configs" / config),
           "--trainer.max_steps=12", *extra]
    proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]


def test_recipe_sp2_with_accumulation_matches_ddp2_through_the_cli(tmp_path) -> None:
    _fit("recipe_sp2_accumulate2.yaml", tmp_path)
    _fit("recipe_dp2.yaml", tmp_path)
    runs = tmp_path / "lightning_logs" / "recipe"
    cmd = [sys.executable, "-m", "lightning_ulysses", "compare", str(runs / "sp2_accumulate2"), str(runs / "dp2"),
           "--tol", "1e-4", "--max-tol", "1e-4", "--plot", str(tmp_path / "recipe.png")]
    proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "12 common steps" in proc.stdout and "PASS" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "recipe.png").exists()
    # a deliberately different run (the same curve, shifted by 0.01 from step 6 on) fails
    a = read_metric(runs / "sp2_accumulate2")
    shifted = _write_csv(tmp_path / "shifted" / "metrics.csv", {s: v + (0.01 if s >= 6 else 0.0) for s, v in a.items()})
    cmd[4] = str(shifted)
    proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout + proc.stderr
