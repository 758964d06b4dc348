"""Lightning's private APIs (checked against lightning 2.5-2.6.6).

The strategy also overrides three private hooks of ``DeepSpeedStrategy`` (``_setup_model_and_optimizer``: the
``mpu`` for DeepSpeed's SP-aware reductions; ``_init_config_if_needed``: called to build the config early for
transformers' ZeRO-3 integration; ``_auto_select_batch_size``: :func:`train_loader_batch_size`) and reads ``_parallel_devices``; ``OVERRIDDEN_PRIVATE_HOOKS`` names them so the
compat test checks they still exist with the signatures we call.
"""

from __future__ import annotations

from typing import Any, Optional

CHECKED = "lightning>=2.5,<=2.6.6"
OVERRIDDEN_PRIVATE_HOOKS = {
    "_setup_model_and_optimizer": ("self", "model", "optimizer", "lr_scheduler"),
    "_init_config_if_needed": ("self",),
    "_auto_select_batch_size": ("self",),
}


def lightning_step_boundary(trainer: Any) -> bool:
    """Whether the current training batch ends an accumulation window (the optimizer steps after it).

    Lightning's own decision (``fit_loop._should_accumulate``): every ``accumulate_grad_batches`` batches from the
    epoch start, and at the epoch's last batch when the strategy does not handle accumulation itself.
    """
    return not trainer.fit_loop._should_accumulate()


def batches_done_in_epoch(trainer: Any) -> int:
    """Training batches of the current epoch that went through ``training_step`` (the one being finished
    included: ``ModelCheckpoint`` saves from ``on_train_batch_end``, before Lightning counts it completed)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def train_loader_batch_size(trainer: Any) -> int:
    """The training loader's batch size, as Lightning's DeepSpeed strategy reads it for DeepSpeed's throughput
    logging (``train_micro_batch_size_per_gpu``): 1 when the loader has no batch sampler or no batch size (a loader
    with ``batch_size=None`` yields unbatched samples, which the strategy then refuses with the fix)."""
    source = trainer.fit_loop._data_source
    if not source.is_defined():
        return 1
    sampler = getattr(source.dataloader(), "batch_sampler", None)
    return int(getattr(sampler, "batch_size", None) or 1)


def trainer_of(module: Any) -> Optional[Any]:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises when there is none)."""
    return getattr(module, "_trainer", None)


def ddp_setup_environment(strategy: Any) -> None:
    """``DDPStrategy.setup_environment`` for a DeepSpeedStrategy subclass: DeepSpeedStrategy's own refuses
    non-CUDA accelerators, DeepSpeed itself runs on CPU with gloo."""
    from lightning.pytorch.strategies import DDPStrategy

    DDPStrategy.setup_environment(strategy)


__all__ = ["CHECKED", "OVERRIDDEN_PRIVATE_HOOKS", "ddp_setup_environment", "lightning_step_boundary",
           "train_loader_batch_size", "trainer_of"]
