"""``CausalLMModule``: a LightningModule around any Hugging Face causal LM, SP-aware.

It works under ``UlyssesDeepSpeedStrategy`` (batches arrive sharded, with ``shift_labels`` and
``position_ids``) and under any other strategy (it prepares full batches itself), so the same module
trains on one CPU, with DDP, or sequence-parallel on many GPUs.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_ulysses.data import prepare_batch
from lightning_ulysses.loss import sp_causal_lm_loss
from lightning_ulysses.model_utils import disable_gradient_checkpointing, enable_gradient_checkpointing
from lightning_ulysses.step_context import current_step_context
from lightning_ulysses.tiled_loss import tiled_loss_enabled

ModelSpec = Union[str, dict[str, Any], Any]


def build_causal_lm(model: ModelSpec, attn_implementation: Optional[str] = "sdpa", dtype: Optional[str] = None):
    """An HF causal LM from a hub name / local path, a config dict (``{"model_type": "llama", ...}``),
    a ``PretrainedConfig``, or an existing model instance (returned as is, attention switched if asked)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    if isinstance(model, PreTrainedModel):
        if attn_implementation is not None and model.config._attn_implementation != attn_implementation:
            model.set_attn_implementation(attn_implementation)
        return model
    if isinstance(model, dict):
        spec = dict(model)
        if "model_type" not in spec:
            raise ValueError("A model config dict needs a 'model_type' key (e.g. 'llama', 'qwen3', 'mistral').")
        model = AutoConfig.for_model(spec.pop("model_type"), **spec)
    if isinstance(model, PretrainedConfig):
        return AutoModelForCausalLM.from_config(model, **kwargs)
    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    raise TypeError(f"Cannot build a causal LM from {type(model).__name__}; pass a name/path, dict, config or model.")


class CausalLMModule(LightningModule):
    """Train an HF causal LM with an SP-correct, token-weighted loss.

    Args:
        model: hub name or local path, config dict (``model_type`` + fields), ``PretrainedConfig``, or a
            ``PreTrainedModel`` instance. Built in :meth:`configure_model` (so ZeRO-3 can shard it at init).
        attn_implementation: ``"sdpa"`` (default), ``"flash_attention_2"`` or ``"flash_attention_3"``;
            ``None`` keeps the model's own.
        optimizer: optimizer factory (LightningCLI: ``class_path`` + ``init_args``).
        lr_scheduler: optional scheduler factory, stepped every optimizer step.
        gradient_checkpointing: recompute each layer in backward (non-reentrant); ``None`` leaves it to
            the strategy (``UlyssesDeepSpeedStrategy`` turns it on when sequence parallelism is active).
        dtype: dtype to build the model in (``"bfloat16"``, ...); ``None`` leaves the default.
        seed: seed for building the model from a config (identical weights on every rank).
    """

    def __init__(
        self,
        model: ModelSpec = "HuggingFaceTB/SmolLM2-135M",
        attn_implementation: Optional[str] = "sdpa",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        gradient_checkpointing: Optional[bool] = None,
        dtype: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from transformers import PreTrainedModel

        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler"] if isinstance(model, PreTrainedModel) else ["optimizer", "lr_scheduler"])
        self.model_spec = model
        self.attn_implementation = attn_implementation
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.gradient_checkpointing = gradient_checkpointing
        self.dtype_name = dtype
        self.seed = seed
        self.model: Optional[torch.nn.Module] = None
        if isinstance(model, PreTrainedModel):
            self.configure_model()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = build_causal_lm(self.model_spec, self.attn_implementation, self.dtype_name)

    # ---------------------------------------------------------------------------------- helpers
    @property
    def sp_group(self):
        strategy = self._trainer.strategy if self._trainer is not None else None
        return getattr(strategy, "sp_group", None)

    def _prepare(self, batch: Any) -> dict[str, Any]:
        if torch.is_tensor(batch):
            batch = {"input_ids": batch}
        if "shift_labels" in batch and "position_ids" in batch:
            return batch  # already prepared (and sharded) by UlyssesDeepSpeedStrategy
        return prepare_batch(batch, pad_to_multiple_of=1)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs).logits

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss of this rank's (shard of the) batch: the DP-group token mean (see :mod:`lightning_ulysses.loss`)."""
        batch = self._prepare(batch)
        if tiled_loss_enabled(self.model):
            # SP-aware token mean computed in tiles inside the model (no logits tensor at all)
            out = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], shift_labels=batch["shift_labels"])
            return out.loss, batch
        logits = self(batch["input_ids"], batch["position_ids"])
        return sp_causal_lm_loss(logits, batch["shift_labels"], self.sp_group), batch

    # ------------------------------------------------------------------------------- lightning
    def on_fit_start(self) -> None:
        # runs after the callbacks' on_fit_start; enable_gradient_checkpointing keeps a policy they chose
        if self.gradient_checkpointing is True:
            enable_gradient_checkpointing(self.model)
        elif self.gradient_checkpointing is False:
            disable_gradient_checkpointing(self.model)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, batch = self.compute_loss(batch)
        self._log_step_loss(loss.detach(), batch_idx, batch["input_ids"].shape[0])
        return loss

    def _log_step_loss(self, loss: torch.Tensor, batch_idx: int, batch_size: int) -> None:
        """Log ``train_loss`` = the loss of the optimizer step, once per step.

        Every rank of an SP group holds its group's loss, so the world mean (``sync_dist``) is the mean over
        DP groups. With ``accumulate_grad_batches = A`` the step's loss combines its micro-batches the way
        the gradient does: their mean (``batch_mean``), or each weighted by its share of the step's tokens
        (``global_tokens``, the weight comes from the strategy's step context). Windows are Lightning's:
        ``A`` batches from the epoch start, the last one cut at the epoch's end.
        """
        ctx = current_step_context()
        weight = ctx.step_loss_weight if ctx is not None and ctx.training else None
        trainer = self.trainer
        acc = trainer.accumulate_grad_batches
        if acc == 1 and weight is None:
            self.log("train_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
            return
        if batch_idx % acc == 0:
            self._window_loss = [torch.zeros((), dtype=torch.float64, device=loss.device), 0]
        total, count = self._window_loss
        self._window_loss = [total + (loss.double() * weight if weight is not None else loss.double()), count + 1]
        if (batch_idx + 1) % acc == 0 or batch_idx + 1 >= trainer.num_training_batches:
            total, count = self._window_loss
            value = total if weight is not None else total / count
            self.log("train_loss", value.float(), prog_bar=True, sync_dist=True, batch_size=batch_size)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, batch = self.compute_loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, batch = self.compute_loss(batch)
        self.log("test_loss", loss, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batch = self._prepare(batch)
        return self(batch["input_ids"], batch["position_ids"])

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


__all__ = ["CausalLMModule", "build_causal_lm"]
