"""Processes end with their own exit code after distributed work (issue #14: the "native abort" at exit).

The cause, found with a ``std::set_terminate`` backtrace: ``ProcessGroupGloo::runLoop`` -> ``TensorImpl::
decref_pyobject`` -> ``PyEval_AcquireThread`` -> ``pthread_exit`` -> forced unwinding through a ``noexcept`` frame ->
``std::terminate``, during interpreter finalization (see ``exit_distributed``). The test harness no longer retries
launched jobs after it.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.harness import WORKERS, worker_env


def test_exit_distributed_with_collectives_in_flight_exits_zero_and_runs_exit_handlers(tmp_path) -> None:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKERS / "exit_inflight.py"), json.dumps({"collectives": 32}), str(out)]
    proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "terminate called" not in proc.stderr
    assert json.loads(out.read_text()) == {"atexit": True}  # atexit handlers still ran
    assert "unflushed tail" in proc.stdout  # and stdout was flushed before os._exit
