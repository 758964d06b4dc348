"""Shared launcher for multi-process CPU tests: ``torchrun --standalone`` in a subprocess.

Never a fixed port (``--standalone`` picks a free one); gloo backend through DeepSpeed's CPU
accelerator; one thread per rank so 4 ranks fit on a 2-core CI machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
        TOKENIZERS_PARALLELISM="false",
    )
    # a rendezvous left in this process's environment by an in-process Trainer is not the subprocess's
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
                "GROUP_RANK"):
        env.pop(key, None)
    # DeepSpeed JIT-builds a small shm comm op on first use (~40 s); keep it across runs.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "lightning_ulysses_torch_extensions"))
    return env


def run_workers(script: str, nproc: int, case: dict[str, Any], tmp_path: Path, timeout: int = 300) -> dict[str, Any]:
    """Run ``tests/workers/<script>`` on ``nproc`` ranks; return what rank 0 wrote as JSON."""
    out = tmp_path / "result.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(WORKERS / script), json.dumps(case), str(out),
    ]
    proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(
            f"{script} with {nproc} ranks failed (rc={proc.returncode}) for case {case}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-10000:]}"
        )
    return json.loads(out.read_text())


def run_cases(cases: dict[str, dict[str, Any]], nproc: int, out_dir: Path, timeout: int = 1500) -> dict[str, Any]:
    """Run several parity cases in one launched job (``tests/workers/families.py``; process start-up dominates on
    2 cores); return each case's result, or for a case the job never finished, the job's output as a string (its
    test then fails with it). Cases run in order in the same processes, so a case also checks that the previous
    ones left no state behind."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKERS / "families.py"), json.dumps(cases), str(out_dir)]
    proc = subprocess.run(cmd, env=worker_env(), cwd=out_dir, capture_output=True, text=True, timeout=timeout)
    failure = (f"the launched job ({nproc} ranks, cases {list(cases)}) failed (rc={proc.returncode}) before this case "
               f"finished\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-10000:]}")
    results: dict[str, Any] = {}
    for name in cases:
        path = out_dir / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.exists() else failure
    if proc.returncode != 0:  # every case finished but the job still failed (e.g. at shutdown): fail them all
        results = {name: failure for name in cases}
    return results


def free_port() -> int:
    """A port the OS says is free now (never a fixed one); the launcher binds it right after."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_nodes(script: str, nodes: int, nproc_per_node: int, case: dict[str, Any], tmp_path: Path, timeout: int = 300):
    """Start ``nodes`` torchrun launchers on localhost as separate "nodes" (static rendezvous, node ranks
    0..nodes-1), as a multi-node job would; return each launcher's (returncode, output) and the seconds the
    slowest one took."""
    import time

    port = free_port()
    out = tmp_path / "result.json"
    procs = []
    start = time.monotonic()
    for node in range(nodes):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={node}",
            f"--nproc_per_node={nproc_per_node}", "--master_addr=127.0.0.1", f"--master_port={port}",
            str(WORKERS / script), json.dumps(case), str(out),
        ]
        procs.append(subprocess.Popen(cmd, env=worker_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=max(1, timeout - (time.monotonic() - start)))
            results.append((p.returncode, stdout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results, time.monotonic() - start


def run_expecting_error(script: str, nproc: int, case: dict[str, Any], tmp_path: Path, timeout: int = 300) -> str:
    """Run a worker that must fail; return its combined output for message checks."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(WORKERS / script), json.dumps(case), str(tmp_path / "result.json"),
    ]
    proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode != 0, f"{script} was expected to fail for {case}"
    return proc.stdout + proc.stderr
