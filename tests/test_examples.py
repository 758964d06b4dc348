"""The 'existing LightningModule' example runs as documented (sp auto -> 2 on 2 processes)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.harness import ROOT, worker_env


def test_existing_module_example_trains_under_sequence_parallelism(tmp_path) -> None:
    cmd = [sys.executable, str(ROOT / "examples" / "existing_module.py"), "--devices", "2", "--steps", "8", "--seq-len", "128"]
    proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "sp 2 x dp 1" in proc.stdout, proc.stdout[-2000:]
    assert re.search(r"final train_loss \d+\.\d+", proc.stdout)
