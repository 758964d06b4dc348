"""Ring attention (forward and backward) equals causal SDPA on the whole sequence, on CPU/gloo; with packed rows,
SDPA with each row's block-diagonal causal mask."""

from __future__ import annotations

import pytest
import torch

from lightning_ulysses.parallel.ring import _blocks, select_kernel
from tests.harness import WORKERS, worker_env

CASES = {
    "rp2_zigzag_mha": (2, dict(heads=4, kv_heads=4, seq=24, zigzag=True)),
    "rp2_contiguous_gqa": (2, dict(heads=4, kv_heads=2, seq=24, zigzag=False)),
    "rp4_zigzag_gqa": (4, dict(heads=4, kv_heads=2, seq=32, zigzag=True)),
    "rp4_contiguous_mqa": (4, dict(heads=4, kv_heads=1, seq=32, zigzag=False)),
    "rp4_zigzag_math_kernel": (4, dict(heads=2, kv_heads=1, seq=16, zigzag=True, backend="math", batch=1)),
    # packed rows: attention stays inside each sample (different boundaries per batch row, across shard borders)
    "rp2_zigzag_gqa_packed": (2, dict(heads=4, kv_heads=2, seq=24, zigzag=True, packed=4)),
    "rp4_contiguous_mha_packed": (4, dict(heads=2, kv_heads=2, seq=32, zigzag=False, packed=6)),
    "rp4_zigzag_math_packed": (4, dict(heads=2, kv_heads=1, seq=32, zigzag=True, packed=5, backend="math")),
}


@pytest.fixture(scope="module")
def kernel_errors(tmp_path_factory) -> dict:
    """Every case's worst errors; the cases of one world size run in one launched job."""
    import json
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("ring_kernel")
    for nproc in sorted({n for n, _ in CASES.values()}):
        cases = {name: case for name, (n, case) in CASES.items() if n == nproc}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKERS / "ring_kernel.py"), json.dumps(cases), str(out)]
        proc = subprocess.run(cmd, env=worker_env(), cwd=out, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {name: json.loads((out / f"{name}.json").read_text()) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_ring_attention_equals_full_causal_sdpa(name, kernel_errors) -> None:
    for key, err in kernel_errors[name].items():
        assert err <= 1e-5, f"{name}: {key} max error {err}"


def test_zigzag_plan_gives_every_rank_equal_work() -> None:
    # One causal block of the local length s plus R-1 blocks of s * s / 2 on every rank.
    s, size = 8, 4
    for rank in range(size):
        work = 0
        for step in range(size):
            rows, cols, causal = _blocks(step, rank, size, True, s)
            work += (rows.stop - rows.start) * (cols.stop - cols.start) // (2 if causal else 1)
        assert work == s * s // 2 + (size - 1) * s * s // 2


def test_contiguous_plan_skips_later_blocks() -> None:
    assert _blocks(1, 0, 4, False, 8) is None  # rank 0 never sees rank 3's (later) tokens
    assert _blocks(1, 1, 4, False, 8) == (slice(0, 8), slice(0, 8), False)


def test_kernel_selection_and_bad_backend() -> None:
    assert select_kernel(torch.device("cpu"), torch.float32).name == "cpu"
    with pytest.raises(ValueError, match="must be one of"):
        select_kernel(torch.device("cpu"), torch.float32, "xformers")
