"""``trainer.predict`` (issue #18, part): the whole sequence's outputs gathered over the SP group, the strategy's
padding removed, for Ulysses and a zigzag Ulysses x ring layout, equal to plain transformers on each row alone."""

from __future__ import annotations

import pytest

from tests.harness import run_workers


@pytest.mark.parametrize("case", [dict(sp=2), dict(sp=4, mode="hybrid")], ids=["sp2", "hybrid_u2_r2_zigzag"])
def test_predict_returns_whole_sequences_at_every_layout(case: dict, tmp_path) -> None:
    r = run_workers("predict.py", case["sp"], case, tmp_path)
    # two rows of 13 and 9 tokens (right-padded to 13), vocabulary 64; padded by the strategy to its multiple
    assert r["shapes"] == {"logits": [2, 13, 64], "token_logprobs": [2, 12], "last_logits": [2, 64]}
    for output, err in r["errors"].items():
        assert err < 1e-5, (output, err)


def test_predict_output_is_checked() -> None:
    from lightning_ulysses import CausalLMModule

    with pytest.raises(ValueError, match="predict_output must be one of"):
        CausalLMModule(model={"model_type": "llama"}, predict_output="probs")
