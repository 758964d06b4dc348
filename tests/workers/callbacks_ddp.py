"""Worker: an existing LightningModule (HF loss via ``model(**batch).loss``) trained with plain DDP,
with and without the memory callbacks; rank 0 writes both loss curves."""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_ulysses.lightning.callbacks import ActivationOffload, TiledAttentionBackward, TiledLoss, TiledMLP  # noqa: E402
from lightning_ulysses.memory.activation_checkpoint import is_checkpointing  # noqa: E402
from lightning_ulysses.memory.tiled_attention import tiled_attention_of  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402
from tests.test_callbacks import PlainLM, token_data  # noqa: E402


def fit(with_callbacks: bool) -> list[float]:
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train_loss"]))

        def on_train_end(self, trainer, pl_module):  # the callbacks remove the tricks at teardown, after this
            if with_callbacks:
                assert module.model.lm_head.__class__.__name__.startswith("TiledLoss")
                assert tiled_attention_of(module.model).calls >= 2

    cbs = [Record()] + ([TiledLoss(tile_tokens=3), TiledMLP(tile_tokens=4), ActivationOffload(), TiledAttentionBackward(tile_tokens=5)]
                    if with_callbacks else [])
    module = PlainLM(checkpointing=True)
    trainer = L.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy="ddp", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=cbs)
    trainer.fit(module, DataLoader(token_data(), batch_size=2))
    assert type(module.model.lm_head).__name__ == "Linear" and tiled_attention_of(module.model) is None
    assert is_checkpointing(module.model)  # the user's own checkpointing stays on
    return losses


def main() -> None:
    plain = fit(False)
    tiled = fit(True)
    if int(os.environ["RANK"]) == 0:
        with open(sys.argv[2], "w") as f:
            json.dump({"plain": plain, "tiled": tiled}, f)
    exit_distributed()


if __name__ == "__main__":
    main()
