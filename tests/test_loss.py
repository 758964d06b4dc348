"""The SP loss equals HF's causal-LM loss, is NaN-safe, and its DeepSpeed scale is measured, not assumed."""

from __future__ import annotations

import pytest
import torch

from lightning_ulysses.parallel.loss import deepspeed_loss_scale, sp_causal_lm_loss, sp_token_mean
from tests.harness import run_cases


def test_single_process_loss_equals_hf_causal_lm_loss() -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 10, 17, requires_grad=True)
    labels = torch.randint(0, 17, (2, 10))
    labels[0, :3] = -100
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    ours = sp_causal_lm_loss(logits, shift)
    ref = ForCausalLMLoss(logits, labels, vocab_size=17)
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours, logits)[0]
    g_ref = torch.autograd.grad(ForCausalLMLoss(logits, labels, vocab_size=17), logits)[0]
    torch.testing.assert_close(g_ours, g_ref)


def test_all_ignored_tokens_give_zero_loss_and_zero_grad_not_nan() -> None:
    logits = torch.randn(1, 4, 5, requires_grad=True)
    shift = torch.full((1, 4), -100)
    loss = sp_causal_lm_loss(logits, shift)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(g).all() and g.abs().sum() == 0


def test_sp_token_mean_value_and_gradient_without_group() -> None:
    local_sum = torch.tensor(6.0, requires_grad=True)
    loss = sp_token_mean(local_sum, torch.tensor(3))
    assert loss.item() == 2.0
    (g,) = torch.autograd.grad(loss, local_sum)
    assert g.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "zero, sp, expected",
    [
        ({"stage": 0}, 4, 1.0),
        ({"stage": 1}, 4, 1.0),
        ({"stage": 2}, 4, 1.0),
        ({"stage": 3}, 4, 4.0),
        ({"stage": 3, "reduce_scatter": False, "contiguous_gradients": True}, 2, 1.0),
        ({"stage": 3, "reduce_scatter": False, "contiguous_gradients": False}, 2, 2.0),
        ({"stage": 3, "reduce_scatter": True, "contiguous_gradients": False}, 2, 2.0),
        ({"stage": 3}, 1, 1.0),
    ],
)
def test_deepspeed_loss_scale_table(zero, sp, expected) -> None:
    assert deepspeed_loss_scale(zero, sp) == expected


REDUCTION_CASES = {
    "zero1": {"stage": 1},
    "zero3_reduce_scatter": {"stage": 3},
    "zero3_allreduce_contiguous": {"stage": 3, "zero": {"reduce_scatter": False, "contiguous_gradients": True}},
    "zero3_allreduce_noncontiguous": {"stage": 3, "zero": {"reduce_scatter": False, "contiguous_gradients": False}},
}


@pytest.fixture(scope="module")
def reductions(tmp_path_factory) -> dict:
    """Every case in one launched job (sp=2 x dp=2): process start-up dominates on 2 cores."""
    cases = {name: {"sp": 2, "heads": 4, "seq_len": 16, "lr": 0.5, "steps": 1, "raw_reduction": True, **zero}
             for name, zero in REDUCTION_CASES.items()}
    return run_cases(cases, 4, tmp_path_factory.mktemp("reductions"))


@pytest.mark.parametrize("name", list(REDUCTION_CASES))
def test_deepspeed_reduction_is_what_deepspeed_loss_scale_corrects(name: str, reductions: dict) -> None:
    """With the correction switched off, DeepSpeed's gradient (sp=2 x dp=2, plain SGD) is the reference
    gradient divided by exactly ``deepspeed_loss_scale``: the factor is measured against DeepSpeed."""
    zero = REDUCTION_CASES[name]
    r = reductions[name]
    if isinstance(r, str):
        raise AssertionError(r)
    zero_cfg = {"stage": zero["stage"], **zero.get("zero", {})}
    assert r["grad_ratio"] == pytest.approx(1.0 / deepspeed_loss_scale(zero_cfg, 2), rel=1e-5)
