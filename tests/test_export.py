"""Hugging Face export (issue #18, part): ``lightning-ulysses export CHECKPOINT OUT_DIR`` turns a ZeRO-2 or ZeRO-3
checkpoint written under the strategy (sp=2) into a directory ``from_pretrained`` loads with the trained model's
logits, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_workers


@pytest.mark.parametrize("stage", [2, 3])
def test_export_gives_the_trained_models_logits(stage: int, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from lightning_ulysses.lightning.cli import main as cli_main

    r = run_workers("export_fit.py", 2, {"stage": stage}, tmp_path)
    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as done:  # the CLI's own entry point, as a user runs it
        cli_main(["export", r["checkpoint"], str(out)])
    assert done.value.code == 0
    assert (out / "config.json").exists() and any(out.glob("*.safetensors"))
    trained = torch.load(r["logits"])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=trained["ids"], use_cache=False).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=1e-6)


def test_export_refuses_what_is_not_a_checkpoint(tmp_path) -> None:
    from lightning_ulysses.tools.export import export_hf

    with pytest.raises(FileNotFoundError):
        export_hf(str(tmp_path / "missing"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint"):
        export_hf(str(tmp_path / "empty"), str(tmp_path / "out"))
