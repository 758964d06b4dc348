"""The memory tricks as callbacks in an existing project: no change to its LightningModule, with and
without sequence parallelism (single device here, DDP in a 2-process worker)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_ulysses.lightning.callbacks import ActivationOffload, GradientCheckpointing, TiledAttentionBackward, TiledLoss, TiledMLP
from lightning_ulysses.memory.activation_checkpoint import is_checkpointing
from lightning_ulysses.memory.offload import activation_offloader
from lightning_ulysses.memory.tiled_attention import tiled_attention_of
from lightning_ulysses.memory.tiled_loss import tiled_loss_enabled
from lightning_ulysses.memory.tiled_mlp import tiled_mlp_enabled
from tests.harness import run_workers


class PlainLM(L.LightningModule):
    """What a user already has: HF model, HF loss, SGD. Nothing lightning_ulysses-specific."""

    def __init__(self, checkpointing: bool = False) -> None:
        super().__init__()
        from tests.test_ulysses import tiny_llama

        self.model = tiny_llama()
        if checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def token_data(n: int = 12, seq: int = 20) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (seq,), generator=g)
        labels = ids.clone()
        labels[:3] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def fit_single_device(callbacks) -> tuple[list[float], PlainLM, dict]:
    """Fit; returns the losses, the module and what the tricks looked like at the end of training (the callbacks
    remove them at teardown)."""
    losses: list[float] = []
    during: dict = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

        def on_train_end(self, trainer, pl_module):
            model = pl_module.model
            offloader, attention = activation_offloader(model), tiled_attention_of(model)
            during.update(tiled_loss=tiled_loss_enabled(model), tiled_mlp=tiled_mlp_enabled(model),
                          attention_calls=attention.calls if attention is not None else 0,
                          checkpointing=is_checkpointing(model),
                          offloaded=offloader.stats.offloaded if offloader is not None else 0)

    module = PlainLM()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record(), *callbacks])
    trainer.fit(module, DataLoader(token_data(), batch_size=2))
    return losses, module, during


def _plain_after_fit(model: torch.nn.Module) -> bool:
    return (not tiled_loss_enabled(model) and not tiled_mlp_enabled(model) and tiled_attention_of(model) is None
            and activation_offloader(model) is None and not is_checkpointing(model)
            and all(not type(m).__name__.startswith(("Tiled", "MemoryEfficient")) for m in model.modules()))


def test_callbacks_on_a_single_device_change_nothing_but_memory() -> None:
    plain, _, _ = fit_single_device([])
    tiled, module, during = fit_single_device(
        [TiledLoss(tile_tokens=3), TiledMLP(tile_tokens=4), ActivationOffload(), TiledAttentionBackward(tile_tokens=5)]
    )
    assert during["tiled_loss"] and during["tiled_mlp"]
    assert during["attention_calls"] >= 2
    assert during["checkpointing"], "ActivationOffload turns checkpointing on"
    assert during["offloaded"] >= 2
    assert tiled == pytest.approx(plain, abs=1e-5)
    assert plain[-1] < plain[0]
    assert _plain_after_fit(module.model), "the callbacks' teardown hands the model back as it came"


def test_gradient_checkpointing_callback() -> None:
    _, module, during = fit_single_device([GradientCheckpointing()])
    assert during["checkpointing"] and not is_checkpointing(module.model)


def test_checkpointing_is_non_reentrant_with_torch_default_early_stop() -> None:
    """ZeRO-3's recompute needs early stop (parity tests fail with early_stop=False)."""
    from lightning_ulysses.memory.activation_checkpoint import checkpoint_kwargs

    assert checkpoint_kwargs() == {"use_reentrant": False}


def test_callbacks_under_ddp_change_nothing_but_memory(tmp_path) -> None:
    r = run_workers("callbacks_ddp.py", 2, {}, tmp_path)
    assert len(r["plain"]) == len(r["tiled"]) == 3
    assert r["tiled"] == pytest.approx(r["plain"], abs=1e-5)


def test_prediction_writer_checks_its_interval() -> None:
    from lightning_ulysses.lightning.callbacks import PredictionWriter

    with pytest.raises(ValueError, match="write_interval must be 'batch' or 'epoch'"):
        PredictionWriter("out", write_interval="step")
