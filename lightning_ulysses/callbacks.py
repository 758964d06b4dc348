"""Lightning callbacks shipped with lightning_ulysses."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class PrintLoss(Callback):
    """Print the (DP-mean) ``train_loss`` every ``every_n_steps`` optimizer steps on rank 0.

    A plain-text trace that survives CI logs and non-interactive shells, where progress bars do not.
    """

    def __init__(self, every_n_steps: int = 10, metric: str = "train_loss") -> None:
        self.every_n_steps = every_n_steps
        self.metric = metric

    @rank_zero_only
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        value = trainer.callback_metrics.get(self.metric)
        if value is not None and (step % self.every_n_steps == 0 or step == 1 or step == trainer.max_steps):
            print(f"step {step:>5d}  {self.metric} {float(value):.4f}", flush=True)
