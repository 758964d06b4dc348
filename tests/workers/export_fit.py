"""Fit a tiny CausalLMModule under the strategy (sp=2, ZeRO ``stage``) with the ``HFExport`` callback, save a
checkpoint, and write the trained model's logits on a fixed input (weights gathered from the ranks) for the export
test.

``export_fit.py CASE_JSON RESULT_JSON``: CASE has ``stage`` (and ``pretrained``, ``lora``, ``peft_as``: ``"dict"``,
``"object"`` for a ``LoraConfig``, ``"model"`` for a PEFT model instance); RESULT gets the checkpoint path and a logits file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402

from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy  # noqa: E402
from lightning_ulysses.data import SyntheticLMDataModule  # noqa: E402
from lightning_ulysses.lightning.callbacks import HFExport  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402

CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def main() -> None:
    case, result = json.loads(sys.argv[1]), Path(sys.argv[2])
    out = result.parent
    model, peft = case.get("pretrained", CONFIG), case.get("lora")
    if peft is not None and case.get("peft_as") in ("model", "object"):  # the other ways in than a dict (YAML)
        from lightning_ulysses.models.adapters import apply_peft, peft_config

        peft = peft_config(dict(peft))
        if case["peft_as"] == "model":
            from transformers import AutoModelForCausalLM

            model, peft = apply_peft(AutoModelForCausalLM.from_pretrained(model), peft), None
    lr = 2.0 if case.get("lora") else 0.5  # adapters start at B = 0 and move slowly
    module = CausalLMModule(model=model, peft=peft, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    data = SyntheticLMDataModule(vocab_size=64, seq_len=16, num_train_samples=4, batch_size=1)
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=2, stage=case["stage"])
    export = HFExport(str(out / "hf_export"), every_n_train_steps=1)  # writes step=1, step=2 and final while fitting
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=2, logger=False, callbacks=[export],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)
    ckpt = out / "ckpt"
    trainer.save_checkpoint(ckpt)
    hf = module.model
    params = list(hf.parameters())
    if case["stage"] == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            weights = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    else:
        weights = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if trainer.global_rank == 0:
        from transformers import AutoConfig, AutoModelForCausalLM

        if case.get("pretrained"):
            plain = AutoModelForCausalLM.from_pretrained(case["pretrained"])
        else:
            spec = dict(CONFIG)
            plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
        if case.get("lora"):
            from lightning_ulysses.models.adapters import apply_peft

            plain = apply_peft(plain, case["lora"])
        plain.load_state_dict(weights)
        ids = (torch.arange(16) * 7 % 64).unsqueeze(0)
        with torch.no_grad():
            logits = plain.eval()(input_ids=ids, use_cache=False).logits
        torch.save({"ids": ids, "logits": logits}, out / "trained_logits.pt")
        result.write_text(json.dumps({"checkpoint": str(ckpt), "logits": str(out / "trained_logits.pt"),
                                      "exported": export.written}))
    exit_distributed()


if __name__ == "__main__":
    main()
