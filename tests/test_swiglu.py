"""Memory-efficient SwiGLU equals HF's gated MLP, saves gate and up only, and composes with tiled MLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_ulysses.memory.activation_checkpoint import saved_tensor_bytes
from lightning_ulysses.memory.rmsnorm import enable_memory_efficient_rmsnorm
from lightning_ulysses.memory.swiglu import (
    SwiGLUFunction,
    disable_memory_efficient_swiglu,
    enable_memory_efficient_swiglu,
    memory_efficient_swiglu_enabled,
    swiglu,
)
from lightning_ulysses.memory.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp, tiled_mlp_enabled
from tests.test_ulysses import tiny_llama


# HF's own ops in the same order: bit-identical values and gradients, in fp32 and bf16, whole or in
# uneven row chunks (15 rows, chunks of 4)
@pytest.mark.parametrize("chunk_rows", [4, 8192])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_function_is_hf_bit_for_bit(dtype, chunk_rows, monkeypatch) -> None:
    import lightning_ulysses.memory.swiglu as mod

    monkeypatch.setattr(mod, "CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    a = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    b = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 24, dtype=dtype)
    ref = F.silu(a) * b
    ours = SwiGLUFunction.apply(a, b)
    assert torch.equal(ours, ref)
    for x, y in zip(torch.autograd.grad(ours, [a, b], g), torch.autograd.grad(ref, [a, b], g)):
        assert torch.equal(x, y)


def test_saves_gate_and_up_only() -> None:
    a = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    hf = saved_tensor_bytes(lambda: F.silu(a) * b)[1]
    ours = saved_tensor_bytes(lambda: SwiGLUFunction.apply(a, b))[1]
    assert ours == 2 * 64 * 256 * 2  # a and b, bf16
    assert hf == 3 * 64 * 256 * 2  # a (silu's backward), silu(a) and b (the product's)


def _grads_equal(model, ref, ids) -> None:
    loss, ref_loss = model(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    loss.backward()
    ref_loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-7, msg=name)
        p.grad = p_ref.grad = None


def test_model_matches_plain_model_alone_and_with_tiled_mlp_in_either_order() -> None:
    ref = tiny_llama()
    ids = torch.randint(0, 64, (2, 10))

    model = tiny_llama()
    assert enable_memory_efficient_swiglu(model, impl="torch") == 2
    enable_memory_efficient_swiglu(model, impl="torch")  # idempotent
    _grads_equal(model, ref, ids)

    enable_tiled_mlp(model, tile_tokens=3)  # tiles now run the fused op
    assert memory_efficient_swiglu_enabled(model) and tiled_mlp_enabled(model)
    calls = []
    orig = SwiGLUFunction.forward
    SwiGLUFunction.forward = staticmethod(lambda ctx, a, b: calls.append(a.shape[0]) or orig(ctx, a, b))
    try:
        _grads_equal(model, ref, ids)
    finally:
        SwiGLUFunction.forward = staticmethod(orig)
    assert calls and max(calls) <= 3, calls  # per tile, not the whole sequence

    disable_tiled_mlp(model)  # untiled again, still fused
    assert memory_efficient_swiglu_enabled(model) and not tiled_mlp_enabled(model)
    assert all(type(layer.mlp).__name__.startswith("MemoryEfficientSwiGLU") for layer in model.model.layers)
    _grads_equal(model, ref, ids)
    disable_memory_efficient_swiglu(model)
    assert not memory_efficient_swiglu_enabled(model)
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in model.model.layers)

    other = tiny_llama()  # tiled first, then fused
    enable_tiled_mlp(other, tile_tokens=3)
    enable_memory_efficient_swiglu(other)
    enable_memory_efficient_rmsnorm(other)
    assert tiled_mlp_enabled(other) and memory_efficient_swiglu_enabled(other)
    loss, ref_loss = other(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)


def test_errors_name_the_fix() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="no SiLU-gated MLP.*turn the option off"):
        enable_memory_efficient_swiglu(gpt2)
    with pytest.raises(ValueError, match="impl must be one of"):
        enable_memory_efficient_swiglu(tiny_llama(), impl="triton")
    a = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="needs liger-kernel installed and a CUDA device.*impl='auto'"):
        swiglu(a, a, impl="liger")
    with pytest.raises(RuntimeError, match="needs liger-kernel installed and a CUDA device"):
        model = tiny_llama()
        enable_memory_efficient_rmsnorm(model, impl="liger")
        model(input_ids=torch.randint(0, 64, (1, 4)))


def s_layout():
    from lightning_ulysses.parallel.layout import ParallelLayout

    return ParallelLayout(1, 1)


def test_strategy_option_installs_the_callback() -> None:
    from lightning_ulysses import UlyssesDeepSpeedStrategy, callbacks

    s = UlyssesDeepSpeedStrategy(sequence_parallel_size=1, memory_efficient_swiglu=True, memory_efficient_rmsnorm=True,
                                 memory_efficient_impl="torch")
    installed = {type(t).__name__: t for t in s.memory_plan.resolve(s_layout().sp_enabled)}
    assert installed["MemoryEfficientSwiGLU"].impl == installed["MemoryEfficientRMSNorm"].impl == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        UlyssesDeepSpeedStrategy(memory_efficient_impl="fast")
    assert callbacks.MemoryEfficientSwiGLU("liger").impl == "liger"
