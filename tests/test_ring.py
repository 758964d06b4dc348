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
    # many short samples: runs of equal padded length batched into one call per rank (and samples across borders)
    "rp4_zigzag_gqa_packed_many_short": (4, dict(heads=4, kv_heads=2, seq=96, zigzag=True, packed=40)),
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


def _masked_reference(q, k, v, segments, dout):
    ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    s = q.shape[2]
    mask = (segments[:, None, :, None] == segments[:, None, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_inputs, attn_mask=mask, enable_gqa=True)
    ref.backward(dout)
    return ref, [t.grad for t in ref_inputs]


@pytest.mark.parametrize("backend,batch_tokens", [("auto", None), ("math", None), ("auto", 64)])
def test_many_short_samples_are_batched_per_length_bucket_and_stay_exact(backend, batch_tokens) -> None:
    """A ring rank's own (step-0) block with hundreds of short samples: a few kernel calls (one per padded-length
    bucket, plus long samples alone; more when a call may hold only ``batch_tokens``), same output and gradients as
    SDPA with the block-diagonal causal mask."""
    from lightning_ulysses.parallel import ring as ring_mod
    from lightning_ulysses.parallel.ring import RingGroup, ring_attention

    torch.manual_seed(0)
    b, h, hkv, d = 2, 4, 2, 8
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(b):  # lengths 1..40 (many share a bucket), one long sample, then more short ones
        lengths = torch.randint(1, 41, (60,), generator=g).tolist() + [300] + torch.randint(1, 9, (40,), generator=g).tolist()
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    s = min(len(r) for r in rows)
    segments = torch.stack([r[:s] for r in rows])
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    dout = torch.randn(b, h, s, d)
    ref, ref_grads = _masked_reference(q, k, v, segments, dout)

    calls = []
    kernel = ring_mod.select_kernel(q.device, q.dtype, backend)
    original = type(kernel).forward

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape)
        return original(self, *args, **kwargs)

    local = [t.clone().requires_grad_() for t in (q, k, v)]
    one = RingGroup(group=None, size=1, rank=0, next_rank=0, prev_rank=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(kernel), "forward", counting)
        if batch_tokens:
            mp.setattr(ring_mod, "BATCH_TOKENS", batch_tokens)
        out = ring_attention(*local, one, zigzag=False, backend=backend, segments=segments)
    out.backward(dout)
    assert (out - ref).abs().max() <= 1e-5
    for got, want in zip(local, ref_grads):
        assert (got.grad - want).abs().max() <= 1e-5
    samples = sum(int(r.unique().numel()) for r in segments)
    assert samples > 150, samples
    if batch_tokens is None:
        assert len(calls) <= 2 * 24, len(calls)  # per row: <= 22 buckets (lengths 1..40) + the long sample
    else:
        assert 2 * 24 < len(calls) < samples, len(calls)
        assert all(shape[0] * shape[2] <= batch_tokens for shape in calls if shape[0] > 1)


def test_bucket_pads_at_most_a_quarter() -> None:
    from lightning_ulysses.parallel.ring import _bucket

    for n in range(1, 5000):
        assert n <= _bucket(n) <= max(n + 1, int(n * 1.25) + 1)
    assert [_bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 17, 33)] == [1, 2, 3, 4, 5, 7, 10, 20, 40]
