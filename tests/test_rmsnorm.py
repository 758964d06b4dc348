"""Memory-efficient RMSNorm equals HF's LlamaRMSNorm and saves less for backward."""

from __future__ import annotations

import pytest
import torch

from lightning_ulysses.memory.activation_checkpoint import saved_tensor_bytes
from lightning_ulysses.memory.rmsnorm import (
    RMSNormFunction,
    disable_memory_efficient_rmsnorm,
    enable_memory_efficient_rmsnorm,
    memory_efficient_rmsnorm_enabled,
)
from tests.test_ulysses import tiny_llama


# statistics are fp32 in both (HF upcasts to fp32 whatever the input dtype); chunk_rows=4 splits the
# 15 rows into uneven chunks
@pytest.mark.parametrize("chunk_rows", [4, 8192])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_function_matches_hf_rmsnorm(dtype, tol, chunk_rows, monkeypatch) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    import lightning_ulysses.memory.rmsnorm as rmsnorm

    monkeypatch.setattr(rmsnorm, "CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-6).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    gy = torch.randn(3, 5, 16, dtype=dtype)
    ref = norm(x)
    ours = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=tol, atol=tol)
    for a, b in zip(torch.autograd.grad(ours, [x, norm.weight], gy), torch.autograd.grad(ref, [x, norm.weight], gy)):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol * 10, atol=tol * 10)


def test_saves_the_input_dtype_not_an_fp32_copy() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(256).to(torch.bfloat16)
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    hf = saved_tensor_bytes(lambda: norm(x))[1]
    ours = saved_tensor_bytes(lambda: RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon))[1]
    # HF keeps fp32 x (4 B/unit) + bf16 output (2 B/unit); ours bf16 x (2 B/unit) + one fp32 per row
    assert ours <= 64 * 256 * 2 + 64 * 4 + 256 * 2
    assert hf >= 64 * 256 * 6


def test_model_with_memory_efficient_rmsnorm_matches_plain_model() -> None:
    ref, model = tiny_llama(), tiny_llama()
    assert enable_memory_efficient_rmsnorm(model) == 5  # 2 per layer + final norm
    enable_memory_efficient_rmsnorm(model)  # idempotent
    ids = torch.randint(0, 64, (2, 10))
    loss, ref_loss = model(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert memory_efficient_rmsnorm_enabled(model)
    disable_memory_efficient_rmsnorm(model)
    assert not memory_efficient_rmsnorm_enabled(model)
