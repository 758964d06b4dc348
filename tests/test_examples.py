"""The 'existing LightningModule' example runs as documented (sp auto -> 2 on 2 processes)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.harness import ROOT, worker_env


@pytest.mark.parametrize("devices", [1, 2])
def test_existing_module_example_trains_unchanged_from_one_to_two_processes(devices: int, tmp_path) -> None:
    # the same training_step (position_ids, shift_labels) on one process (sp=1) and under SP (issue #14)
    cmd = [sys.executable, str(ROOT / "examples" / "existing_module.py"), "--devices", str(devices), "--steps", "8",
           "--seq-len", "128"]
    proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert f"sp {devices} x dp 1" in proc.stdout, proc.stdout[-2000:]
    assert re.search(r"final train_loss \d+\.\d+", proc.stdout)


def test_rl_from_rollouts_example_trains_under_sp(tmp_path) -> None:
    """examples/rl_from_rollouts.py: the clipped policy-gradient loss on stored rollouts at sp=2."""
    cmd = [sys.executable, str(ROOT / "examples" / "rl_from_rollouts.py"), "--devices", "2", "--steps", "4"]
    proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "sp 2 x dp 1" in proc.stdout and re.search(r"final train_loss -?\d+\.\d+, entropy \d+\.\d+", proc.stdout)
