"""The README's quickstart trains on CPU and its loss falls; its checkpoint validates, resumes and predicts through the
CLI's subcommands."""

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
    # the CLI's `validate` subcommand on that checkpoint gives the validation loss fit printed at its end
    fit_val = float(re.findall(r"step\s+30\s+val_loss (\d+\.\d+)", proc.stdout)[-1])
    validate = [sys.executable, "-m", "lightning_ulysses", "validate", "--config",
                str(ROOT / "configs" / "quickstart.yaml"), "--ckpt_path", "last"]
    proc = subprocess.run(validate, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    val = float(re.search(r"val_loss\s*\S\s*(\d+\.\d+)", proc.stdout).group(1))
    assert abs(val - fit_val) < 1e-3, (val, fit_val)
    # `predict` with PredictionWriter leaves the outputs in files: at the saved layout (sp=2: one DP group, written by
    # its first rank only) and at sp=1 x dp=2 (each DP group its own rows); a row's logits are the same at both
    for name, sp, files in [("sp2", 2, ["dp0_batch000000.pt", "dp0_batch000001.pt"]),
                            ("dp2", 1, ["dp0_batch000000.pt", "dp0_batch000001.pt", "dp1_batch000000.pt",
                                        "dp1_batch000001.pt"])]:
        predict = [sys.executable, "-m", "lightning_ulysses", "predict", "--config",
                   str(ROOT / "configs" / "quickstart.yaml"), "--ckpt_path", "last",
                   f"--trainer.strategy.init_args.sequence_parallel_size={sp}", "--trainer.limit_predict_batches=2",
                   "--trainer.callbacks+=lightning_ulysses.lightning.callbacks.PredictionWriter",
                   f"--trainer.callbacks.init_args.dirpath={tmp_path / name}"]
        proc = subprocess.run(predict, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
        assert sorted(f.name for f in (tmp_path / name).iterdir()) == files
    import torch

    at_sp2 = torch.load(tmp_path / "sp2" / "dp0_batch000001.pt")
    at_dp2 = torch.load(tmp_path / "dp2" / "dp1_batch000000.pt")
    assert at_sp2["batch_indices"] == at_dp2["batch_indices"] == [1]
    assert at_sp2["prediction"].shape == (1, 2048, 256)  # [b, S, V]: the whole sequence, gathered over the SP group
    torch.testing.assert_close(at_sp2["prediction"], at_dp2["prediction"], rtol=1e-5, atol=1e-5)
    resume = [sys.executable, "-m", "lightning_ulysses", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
              "--ckpt_path", "last", "--trainer.max_steps=32"]
    proc = subprocess.run(resume, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "Restored all states from the checkpoint" in out and "last.ckpt" in out
    assert re.search(r"step\s+32\s+train_loss", proc.stdout), proc.stdout[-2000:]
    assert not re.search(r"step\s+1\s+train_loss", proc.stdout)  # it continued, it did not start over
