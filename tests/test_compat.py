"""Private dependency APIs wrapped in lightning_ulysses.compat still mean what the wrappers assume."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_ulysses.compat import lightning_step_boundary


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.boundaries: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.boundaries.append(lightning_step_boundary(self.trainer))
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_step_boundary_is_every_accumulation_window_and_the_epoch_end(tmp_path) -> None:
    module = _Tiny()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(torch.randn(5, 2), batch_size=1))
    # 5 batches per epoch: windows [0,1], [2,3], [4] (short, at the epoch end); windows restart each epoch
    assert module.boundaries == [False, True, False, True, True] * 2
    assert trainer.global_step == 6
