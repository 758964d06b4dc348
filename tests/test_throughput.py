"""Throughput accounting: the FLOP formulas and the callback's per-step metrics."""

from __future__ import annotations

import pytest

from lightning_ulysses.lightning.callbacks import SequenceThroughput
import torch

from lightning_ulysses.models.flops import ModelDims, model_flops, peak_flops_per_gpu, recompute_flops
from tests.test_callbacks import fit_single_device


def test_llama3_8b_dims_and_flops_match_the_reference_formula() -> None:
    # ../shared/gpu/README.md: N_mm = 7,504,924_672; 6*N_mm*S + 6*L*S^2*H; 337 TFLOPS/GPU at 64K in 4.69 s on 4 GPUs
    dims = ModelDims(n_matmul_params=7_504_924_672, layers=32, hidden=4096)
    s = 65536
    flops = model_flops(dims, s, s * s)
    assert flops / 4.69 / 4 / 1e12 == pytest.approx(337, abs=1)
    assert recompute_flops(dims, s, s * s) == pytest.approx(flops / 3)


def test_model_dims_exclude_the_input_embedding() -> None:
    from tests.test_ulysses import tiny_llama

    model = tiny_llama()
    dims = ModelDims.of(model)
    total = sum(p.numel() for p in model.parameters())
    assert dims.n_matmul_params == total - 64 * 32 and dims.layers == 2 and dims.hidden == 32


def test_callback_logs_tokens_and_tflops_every_step(capsys) -> None:
    cb = SequenceThroughput(warmup_steps=1)
    fit_single_device([cb])
    assert len(cb.history) == 4
    for m in cb.history:
        assert m["throughput/tokens_per_sec"] > 0 and m["throughput/model_tflops_per_gpu"] > 0
        # no checkpointing here: hardware FLOPs == model FLOPs
        assert m["throughput/hw_tflops_per_gpu"] == pytest.approx(m["throughput/model_tflops_per_gpu"])
        assert "throughput/mfu" not in m  # no known peak on CPU
        # 2 sequences of 20 tokens per step
        assert m["throughput/tokens_per_sec"] * m["throughput/step_s"] == pytest.approx(40)
    assert "throughput (median of 3 steps)" in capsys.readouterr().out


def test_chips_lightning_lacks_still_get_an_mfu_peak() -> None:
    from lightning_ulysses.models.flops import chip_bf16_tflops

    assert chip_bf16_tflops("NVIDIA H200") == 989.4 and chip_bf16_tflops("NVIDIA H200 NVL") is None
    assert chip_bf16_tflops("NVIDIA H100 80GB HBM3") is None  # Lightning's own table has it
    assert peak_flops_per_gpu(torch.device("cpu"), peak_tflops=786.0) == 786e12


def test_callback_counts_the_recompute_of_whatever_turned_checkpointing_on() -> None:
    from lightning_ulysses import GradientCheckpointing

    cb = SequenceThroughput(warmup_steps=1)
    fit_single_device([GradientCheckpointing(), cb])
    for m in cb.history:  # full checkpointing: one more forward, (6 + 2) / 6 of the model FLOPs at this size
        assert m["throughput/hw_tflops_per_gpu"] > m["throughput/model_tflops_per_gpu"] * 1.3


def test_packed_rows_count_attention_per_segment() -> None:
    from lightning_ulysses.models.flops import sum_sq_len

    assert sum_sq_len(2, 16) == 2 * 16 * 16
    # one row of 8 documents of 2 tokens, one of a single 16-token document
    assert sum_sq_len(2, 16, [[(i, i + 2) for i in range(0, 16, 2)], [(0, 16)]]) == 8 * 4 + 256
