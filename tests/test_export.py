"""Hugging Face export (issue #18, part): ``lightning-ulysses export CHECKPOINT OUT_DIR`` turns a ZeRO-2 or ZeRO-3
checkpoint written under the strategy (sp=2) into a directory ``from_pretrained`` loads with the trained model's
logits, fp32 on CPU."""

from __future__ import annotations

from pathlib import Path

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
    # the HFExport callback wrote the same model while fitting (every step and at the end), no export step needed
    assert [Path(p).name for p in r["exported"]] == ["step=1", "step=2", "final"]
    final = AutoModelForCausalLM.from_pretrained(r["exported"][-1]).eval()
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=trained["ids"], use_cache=False).logits, trained["logits"],
                                   rtol=0, atol=1e-6)
    assert not list(Path(r["exported"][-1]).parent.glob("*.partial"))


def test_export_refuses_what_is_not_a_checkpoint(tmp_path) -> None:
    from lightning_ulysses.tools.export import export_hf

    with pytest.raises(FileNotFoundError):
        export_hf(str(tmp_path / "missing"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint"):
        export_hf(str(tmp_path / "empty"), str(tmp_path / "out"))


@pytest.mark.parametrize("peft_as", ["dict", "object", "model"])
def test_lora_export_writes_adapters_or_the_merged_model(peft_as: str, tmp_path) -> None:
    """A LoRA run (sp=2, ZeRO-3) exports its adapters -- PeftModel.from_pretrained(base, dir) -- or, with --merge,
    the base model with the adapters merged in; both give the trained model's logits, with no flags, whether the
    adapters came as a dict (YAML), a ``LoraConfig`` object or a PEFT model instance."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_ulysses.tools.export import export_hf

    base = tmp_path / "base"
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    r = run_workers("export_fit.py", 2, {"stage": 3, "pretrained": str(base), "lora": lora, "peft_as": peft_as}, tmp_path)
    trained = torch.load(r["logits"])
    adapters = export_hf(r["checkpoint"], str(tmp_path / "adapters"))
    merged = export_hf(r["checkpoint"], str(tmp_path / "merged"), merge=True)
    assert (adapters / "adapter_config.json").exists() and not (adapters / "config.json").exists()
    during = Path(r["exported"][-1])  # HFExport during the fit writes the adapters too, naming the base model
    assert (during / "adapter_config.json").exists() and not (during / "config.json").exists()
    with torch.no_grad():
        a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters).eval()
        m = AutoModelForCausalLM.from_pretrained(merged).eval()
        d = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), during).eval()
        for model in (a, m, d):
            logits = model(input_ids=trained["ids"], use_cache=False).logits
            torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=1e-5)
        untrained = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=trained["ids"], use_cache=False).logits
    assert (untrained - trained["logits"]).abs().max() > 1e-3, "the adapters did not train: the test would prove nothing"
