"""Tiled logits+loss equals plain cross-entropy: values and gradients, parameter by parameter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_ulysses.memory.tiled_loss import (
    TiledLinearCrossEntropy,
    disable_tiled_loss,
    enable_tiled_loss,
    tile_size,
    tiled_loss_enabled,
)
from tests.test_ulysses import tiny_llama


def plain(h, w, b, y):
    return F.cross_entropy(F.linear(h, w, b).float(), y, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("tile", [1, 4, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_tiled_sum_matches_plain_cross_entropy_with_upstream_gradient(tile, with_bias) -> None:
    torch.manual_seed(0)
    h = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True) if with_bias else None
    y = torch.randint(0, 40, (23,))
    y[::3] = -100
    inputs = [h, w] + ([b] if with_bias else [])
    # an upstream gradient != 1 (e.g. 1 / num_tokens): DeepSpeed's TiledFusedLogitsLoss ignores it for lm_head
    ref = plain(h, w, b, y) * 0.37
    out = TiledLinearCrossEntropy.apply(h, w, b, y, tile) * 0.37
    torch.testing.assert_close(out.double(), ref.double(), rtol=1e-6, atol=1e-6)
    for got, want in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_all_ignored_tiles_give_zero_loss_and_zero_grads() -> None:
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    out = TiledLinearCrossEntropy.apply(h, w, None, torch.full((6,), -100), 4)
    assert out.item() == 0.0
    gh, gw = torch.autograd.grad(out, [h, w])
    assert gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_default_tile_keeps_one_fp32_logits_tile_near_1gib() -> None:
    assert tile_size(1_000_000, 128_256) == 2**28 // 128_256
    assert tile_size(10, 128_256) == 10
    with pytest.raises(ValueError, match="tile_tokens must be >= 1"):
        tile_size(10, 10, 0)


def test_model_with_tiled_loss_matches_hf_loss_and_gradients() -> None:
    model, ref_model = tiny_llama(), tiny_llama()
    ids = torch.randint(0, 64, (2, 11))
    labels = ids.clone()
    labels[1, :5] = -100
    ref = ref_model(input_ids=ids, labels=labels)
    keys = sorted(model.state_dict())
    enable_tiled_loss(model, tile_tokens=4)
    enable_tiled_loss(model, tile_tokens=4)  # idempotent
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None, "the point is to never build the logits"
    torch.testing.assert_close(out.loss, ref.loss)
    ref.loss.backward()
    out.loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert sorted(model.state_dict()) == keys
    # num_items_in_batch (gradient accumulation in HF style): sum / N
    n = torch.tensor(50)
    torch.testing.assert_close(
        model(input_ids=ids, labels=labels, num_items_in_batch=n).loss,
        ref_model(input_ids=ids, labels=labels, num_items_in_batch=n).loss,
    )
    assert model(input_ids=ids).logits.shape == (2, 11, 64)  # plain calls untouched
    disable_tiled_loss(model)
    assert not tiled_loss_enabled(model) and type(model.lm_head) is torch.nn.Linear
    assert model(input_ids=ids, labels=labels).logits is not None


def test_a_peft_model_gets_its_base_models_tricks() -> None:
    """``apply_tricks`` on a ``PeftModel`` (as a project holding one would call it): the tiled loss goes on the base
    transformers model, the adapters train, and the loss is the plain one; ``remove_tricks`` takes it off again."""
    import peft

    from lightning_ulysses.memory import TiledLoss
    from lightning_ulysses.memory.trick import apply_tricks, remove_tricks

    def lora(model):
        return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    torch.manual_seed(0)
    model = lora(tiny_llama())
    ref = lora(tiny_llama())
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 11))
    apply_tricks(model, [TiledLoss(tile_tokens=4)])
    assert tiled_loss_enabled(model.get_base_model())
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref(input_ids=ids, labels=ids).loss)
    remove_tricks(model, [TiledLoss(tile_tokens=4)])
    assert not tiled_loss_enabled(model.get_base_model())


def test_models_that_transform_logits_are_refused() -> None:
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="set tiled_loss=False"):
        enable_tiled_loss(model)


def test_tokens_without_a_label_skip_the_lm_head(monkeypatch) -> None:
    """A long prompt (or a user turn) is ignored by the loss, so its tokens never go through the lm_head: with 3 of 4
    tokens ignored, the head's matmuls see a quarter of the rows, and the loss and every gradient are unchanged."""
    import lightning_ulysses.memory.tiled_loss as tl

    torch.manual_seed(0)
    h = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 40, (64,))
    y[:48] = -100  # the prompt
    rows = []
    linear = F.linear
    monkeypatch.setattr(tl.F, "linear", lambda x, *a: rows.append(x.shape[0]) or linear(x, *a))
    out = tl.linear_cross_entropy_sum(h, w, None, y, tile_tokens=8, impl="torch")
    grads = torch.autograd.grad(out, [h, w])
    assert sum(rows) == 2 * 16  # forward + backward tiles, over the 16 labelled tokens only
    monkeypatch.setattr(tl.F, "linear", linear)
    ref = plain(h, w, None, y)
    torch.testing.assert_close(out.double(), ref.double(), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(ref, [h, w])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert bool((grads[0][:48] == 0).all())
