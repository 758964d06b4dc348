"""The README's quickstart trains on CPU and its loss falls."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.harness import ROOT, worker_env


def test_quickstart_cli_trains_with_sp2_and_loss_falls(tmp_path) -> None:
    cmd = [sys.executable, "-m", "lightning_ulysses", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
           "--trainer.max_steps=30", "--trainer.val_check_interval=30"]
    proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "sp 2 x dp 1" in proc.stdout + proc.stderr
    losses = [float(x) for x in re.findall(r"train_loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) >= 3 and losses[-1] < 0.6 * losses[0], losses
    assert "tokens/s" in proc.stdout and "model TFLOPS/GPU" in proc.stdout
    # the config saves a checkpoint every 30 steps; the README's resume command continues from the newest
    assert (tmp_path / "lightning_logs" / "quickstart" / "checkpoints" / "last.ckpt").is_symlink()
    resume = [sys.executable, "-m", "lightning_ulysses", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
              "--ckpt_path", "last", "--trainer.max_steps=32"]
    proc = subprocess.run(resume, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "Restored all states from the checkpoint" in out and "last.ckpt" in out
    assert re.search(r"step\s+32\s+train_loss", proc.stdout), proc.stdout[-2000:]
    assert not re.search(r"step\s+1\s+train_loss", proc.stdout)  # it continued, it did not start over
