"""Tiled MLP equals the plain MLP: outputs, input gradients and every parameter gradient."""

from __future__ import annotations

import pytest
import torch

from lightning_ulysses.memory.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp, tiled_mlp_enabled
from tests.test_ulysses import tiny_llama


@pytest.mark.parametrize("tile_tokens", [1, 5, 8, 1000])
def test_tiled_model_matches_plain_model(tile_tokens) -> None:
    ref, model = tiny_llama(), tiny_llama()
    assert enable_tiled_mlp(model, tile_tokens=tile_tokens) == 2
    ids = torch.randint(0, 64, (2, 13))  # 26 tokens: tiles of 5 and 8 do not divide it
    ref_loss = ref(input_ids=ids, labels=ids).loss
    loss = model(input_ids=ids, labels=ids).loss
    # fp32; tiling only changes the summation order of parameter gradients across tiles
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    ref_loss.backward()
    loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_each_parameter_receives_exactly_one_gradient_per_backward() -> None:
    """What DDP's reducer and ZeRO-1/2 buckets need: one hook call per parameter per backward."""
    model = tiny_llama()
    enable_tiled_mlp(model, tile_tokens=3)
    calls: dict[str, int] = {}
    for name, p in model.named_parameters():
        if ".mlp." in name:
            p.register_post_accumulate_grad_hook(lambda p, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    ids = torch.randint(0, 64, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls and set(calls.values()) == {1}, calls


def test_works_under_gradient_checkpointing_and_can_be_disabled() -> None:
    ref, model = tiny_llama(), tiny_llama()
    for m in (ref, model):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_tiled_mlp(model, tile_tokens=4)
    ids = torch.randint(0, 64, (1, 12))
    ref(input_ids=ids, labels=ids).loss.backward()
    model(input_ids=ids, labels=ids).loss.backward()
    for p, p_ref in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6)
    assert tiled_mlp_enabled(model)
    disable_tiled_mlp(model)
    assert not tiled_mlp_enabled(model)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_forward_without_grad_is_tiled_too(mode) -> None:
    """Validation, a frozen reference/teacher and predict run without grad: their MLP intermediates stay one tile's
    (untiled, gate/up/their product for every token at once were the peak of a long-context validation step)."""
    ref, model = tiny_llama(), tiny_llama()
    enable_tiled_mlp(model, tile_tokens=5)
    rows: list[int] = []
    for layer in model.model.layers:
        layer.mlp.gate_proj.register_forward_hook(lambda m, args, out: rows.append(out.reshape(-1, out.shape[-1]).shape[0]))
    ids = torch.randint(0, 64, (2, 13))  # 26 tokens: 6 tiles of at most 5
    with getattr(torch, mode)():
        out, expected = model(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert len(rows) == 2 * 6 and max(rows) <= 5, rows
