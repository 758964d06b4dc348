"""Sequence parallelism for a LightningModule you already have.

Three changes to a plain HF LightningModule:
1. ``strategy=UlyssesDeepSpeedStrategy(...)`` (or ``"ulysses"``) in the Trainer;
2. pass ``position_ids`` to the model (the strategy puts global positions in every batch);
3. compute the loss with ``sp_causal_lm_loss(logits, batch["shift_labels"], group=strategy.sp_group)``:
   each rank only holds a shard of every sequence, so the token mean needs the whole SP group.

Runs on CPU (2 processes, gloo) or GPUs:  python examples/existing_module.py --devices 2
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig

import lightning_ulysses  # noqa: F401  (registers the "ulysses" strategy names)
from lightning_ulysses import UlyssesDeepSpeedStrategy, exit_distributed, sp_causal_lm_loss
from lightning_ulysses.data.synthetic import MarkovTokens


class MyLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        self.model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")

    def training_step(self, batch, batch_idx):
        # batch: this rank's shard -> input_ids, position_ids, shift_labels: [b, seq/sp]
        logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = sp_causal_lm_loss(logits, batch["shift_labels"], group=self.trainer.strategy.sp_group)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()
    L.seed_everything(0)
    data = DataLoader(MarkovTokens(256, args.seq_len, vocab_size=128), batch_size=1)
    trainer = L.Trainer(
        accelerator="auto", devices=args.devices, max_steps=args.steps, logger=False, enable_checkpointing=False,
        strategy=UlyssesDeepSpeedStrategy(sequence_parallel_size="auto", stage=2),
    )
    trainer.fit(MyLM(), data)
    if trainer.is_global_zero:
        print(f"layout: {trainer.strategy.layout.describe()}; final train_loss {float(trainer.callback_metrics['train_loss']):.4f}")
    exit_distributed()  # ends the process (see README: a clean exit code after distributed training)


if __name__ == "__main__":
    main()
