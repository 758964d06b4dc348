"""Lightning callbacks shipped with lightning_ulysses."""

from __future__ import annotations

from typing import Any, Optional

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


class _HFModelTransform(Callback):
    """Applies a transformation to the Hugging Face model inside the LightningModule at the start of
    every stage (idempotent), so it also reaches models built in ``configure_model``."""

    def apply(self, model: Any, trainer: Trainer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_ulysses.model_utils import find_hf_model

        model = find_hf_model(pl_module)
        if model is None:
            raise ValueError(
                f"{type(self).__name__} needs a transformers PreTrainedModel inside the LightningModule; none was found."
            )
        self.apply(model, trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)


class GradientCheckpointing(_HFModelTransform):
    """Non-reentrant gradient checkpointing of every decoder layer (HF's own mechanism)."""

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.model_utils import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)


class TiledLoss(_HFModelTransform):
    """Tiled logits + cross-entropy (:mod:`lightning_ulysses.tiled_loss`): ``model(..., labels=...)``
    returns the loss without ever materialising the ``[tokens, vocab]`` logits (``logits`` is None).

    Args:
        tile_tokens: tokens per tile; default keeps one fp32 logits tile at ~1 GiB.
        impl: ``"auto"`` (Liger's fused kernel when liger-kernel is installed and the model is on CUDA,
            else the torch implementation), ``"torch"`` or ``"liger"``.
    """

    def __init__(self, tile_tokens: Optional[int] = None, impl: str = "auto") -> None:
        self.tile_tokens = tile_tokens
        self.impl = impl

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.tiled_loss import enable_tiled_loss

        enable_tiled_loss(model, self.tile_tokens, self.impl)


class ActivationOffload(_HFModelTransform):
    """Checkpointed layer inputs wait for backward in CPU memory (:mod:`lightning_ulysses.offload`).

    Turns gradient checkpointing on if it is off (there is nothing to offload without it).
    """

    def __init__(self, min_bytes: int = 0) -> None:
        self.min_bytes = min_bytes

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.offload import activation_offloader, enable_activation_offload

        GradientCheckpointing().apply(model, trainer)
        if activation_offloader(model) is None:
            enable_activation_offload(model, self.min_bytes)


class TiledMLP(_HFModelTransform):
    """Each decoder layer's MLP computed in token tiles (:mod:`lightning_ulysses.tiled_mlp`).

    Args:
        tile_tokens: tokens per tile; default: the model's hidden size.
    """

    def __init__(self, tile_tokens: Optional[int] = None) -> None:
        self.tile_tokens = tile_tokens

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.tiled_mlp import enable_tiled_mlp

        enable_tiled_mlp(model, self.tile_tokens)


class MemoryEfficientRMSNorm(_HFModelTransform):
    """Llama-style RMSNorms that keep their input, not an fp32 copy, for backward
    (:mod:`lightning_ulysses.rmsnorm`)."""

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.rmsnorm import enable_memory_efficient_rmsnorm

        enable_memory_efficient_rmsnorm(model)
