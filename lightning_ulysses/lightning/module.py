"""``CausalLMModule``: a LightningModule around any Hugging Face causal LM, SP-aware.

It works under ``UlyssesDeepSpeedStrategy`` (batches arrive sharded, with ``shift_labels`` and
``position_ids``) and under any other strategy (it prepares full batches itself), so the same module
trains on one CPU, with DDP, or sequence-parallel on many GPUs.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from typing_extensions import override

from lightning_ulysses.errors import errors_reported_once
from lightning_ulysses.memory.activation_checkpoint import GradientCheckpointing
from lightning_ulysses.memory.trick import MemoryTrick, apply_tricks, remove_tricks, trainer_tricks
from lightning_ulysses.memory.tiled_loss import tiled_loss_enabled
from lightning_ulysses.models.adapters import adapter_config, apply_peft, is_peft_model, peft_record, trainable_parameters
from lightning_ulysses.models.build import ModelSpec, build_causal_lm, import_model_code, model_record
from lightning_ulysses.models.inspect import find_hf_model, find_hf_models
from lightning_ulysses.models.multimodal import checked_vision_inputs, freeze_vision
from lightning_ulysses.parallel.loss import sp_causal_lm_loss
from lightning_ulysses.parallel.moe import moe_router_spec, sp_load_balancing_loss
from lightning_ulysses.parallel.sharding import IGNORE_INDEX, prepare_batch
from lightning_ulysses.parallel.step_context import current_step_context, step_context_for

PREDICT_OUTPUTS = ("logits", "token_logprobs", "last_logits")


def component_factory(spec: Any, what: str) -> Optional[Callable[..., Any]]:
    """The factory behind ``optimizer=`` / ``lr_scheduler=``, from every form a user writes: a callable (a class such
    as ``torch.optim.SGD``, a ``functools.partial``, LightningCLI's callable), a class path (``"torch.optim.SGD"``; a
    bare name such as ``"SGD"`` is looked up in ``torch.optim`` / ``torch.optim.lr_scheduler``) or
    the YAML form as a dict (``{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}``), which becomes
    ``partial(class, **init_args)``. ``None`` stays ``None``. Anything else -- an optimizer *instance* included (the
    module builds it over its own trainable parameters) -- is refused with the forms it takes."""
    if spec is None or (callable(spec) and not isinstance(spec, (str, Mapping))):
        return spec
    example = ("torch.optim.SGD" if what == "optimizer" else "torch.optim.lr_scheduler.LinearLR")
    forms = (f"a class or callable (e.g. {example} or functools.partial({example}, ...)), its class path "
             f"({example!r}) or a dict {{'class_path': {example!r}, 'init_args': {{...}}}}")
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, Mapping):
        over = "its trainable parameters" if what == "optimizer" else "its optimizer"
        raise TypeError(f"{what} must be {forms}; got a {type(spec).__name__} instance (the module builds the "
                        f"{what} itself, over {over}).")
    unknown = sorted(set(spec) - {"class_path", "init_args"})
    if "class_path" not in spec or unknown:
        raise ValueError(f"{what} must be {forms}; got a dict with keys {sorted(spec)}"
                         + (f" ({unknown} belong under 'init_args')." if unknown and "class_path" in spec else "."))
    path = str(spec["class_path"])
    module, _, name = path.rpartition(".")
    # a bare name is looked up where LightningCLI looks it up: torch's optimizers / schedulers
    module = module or ("torch.optim" if what == "optimizer" else "torch.optim.lr_scheduler")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{what}: cannot import {path!r} ({error}); give the full class path, e.g. {example!r}.") from error
    return functools.partial(cls, **dict(spec.get("init_args") or {}))


class CausalLMModule(LightningModule):
    """Train an HF causal LM with an SP-correct, token-weighted loss.

    Args:
        model: hub name or local path, config dict (``model_type`` + fields), ``PretrainedConfig``, or a
            ``PreTrainedModel`` / PEFT model instance. Built in :meth:`configure_model` (so ZeRO-3 can shard it at
            init; with ZeRO-3 a checkpoint is loaded straight into the partitions).
        attn_implementation: ``"sdpa"``, ``"flash_attention_2"``, ``"flash_attention_3"`` or ``"eager"`` (under SP:
            [S, S] scores per head, for short sequences or models with nothing else, e.g. Gemma-2 without
            flash-attn). ``None`` (default): the model's own -- transformers' choice, ``sdpa`` where the model supports
            it, else ``eager``; an instance keeps what it was built with. (A fixed ``"sdpa"`` would make transformers
            refuse models without an sdpa path, e.g. Mamba, before the strategy could place them.)
        optimizer: optimizer factory, called with the trainable parameters: a class (``torch.optim.SGD``), a
            ``functools.partial`` or any callable, a class path (``"torch.optim.SGD"``), or a dict as YAML writes it
            (``{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}``; LightningCLI: ``class_path`` +
            ``init_args``).
        lr_scheduler: optional scheduler factory, called with the optimizer (the same forms), stepped every
            optimizer step.
        gradient_checkpointing: recompute each layer in backward (non-reentrant); ``None`` leaves it to
            the strategy (``UlyssesDeepSpeedStrategy`` turns it on when sequence parallelism is active).
        dtype: dtype to build the model in (``"bfloat16"``, ...); ``None`` leaves the default.
        seed: seed for building the model from a config (identical weights on every rank).
        peft: adapters to add after the model is built: a ``peft.PeftConfig`` (e.g. ``LoraConfig(r=16,
            target_modules="all-linear")``) or a dict (YAML: ``{peft_type: LORA, r: 16, target_modules: all-linear}``
            or ``{class_path: peft.LoraConfig, init_args: {...}}``). Only trainable (adapter) parameters go to the
            optimizer; base weights stay frozen. Needs ``pip install lightning-ulysses[peft]``.
        trust_remote_code: let transformers run a checkpoint's own modelling code (off unless asked).
        predict_output: what ``trainer.predict`` returns per batch, the whole sequence at every layout (gathered over
            the SP group, cut to the batch's own length): ``"logits"`` (``[b, S, V]``), ``"token_logprobs"``
            (``[b, S-1]``: log-probability of each next token, 0 where its label is masked; never builds the full
            ``[b, S, V]`` on one rank) or ``"last_logits"`` (``[b, V]`` at each row's last non-padding token).
        freeze_vision_tower: a vision-language model's vision encoder (without its projector) does not train.
        freeze_projector: its projector (the patch merger of Qwen-VL) does not train.
    """

    @errors_reported_once  # every rank builds the module from the same arguments: one report of a bad one
    def __init__(
        self,
        model: ModelSpec = "HuggingFaceTB/SmolLM2-135M",
        attn_implementation: Optional[str] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        gradient_checkpointing: Optional[bool] = None,
        dtype: Optional[str] = None,
        seed: int = 0,
        peft: Optional[Any] = None,
        trust_remote_code: bool = False,
        predict_output: str = "logits",
        freeze_vision_tower: bool = False,
        freeze_projector: bool = False,
    ) -> None:
        super().__init__()
        if predict_output not in PREDICT_OUTPUTS:
            raise ValueError(f"predict_output must be one of {list(PREDICT_OUTPUTS)}, got {predict_output!r}.")
        from transformers import PreTrainedModel

        instance = isinstance(model, PreTrainedModel) or is_peft_model(model)
        if peft is not None and is_peft_model(model):
            raise ValueError("The model is already a PEFT model; pass either a PEFT model or peft=..., not both.")
        # the hyperparameters say how to rebuild the model (export, load_from_checkpoint) as plain data: an instance
        # as its config dict (+ its adapters' config), a PretrainedConfig / PeftConfig object as its dict
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "model", "peft"])
        self.hparams["model"] = model_record(model)
        self.hparams["peft"] = peft_record(adapter_config(model) if is_peft_model(model) else peft)
        # an instance is built already; it must not also be stored as a second attribute (it would be registered as
        # a submodule and its parameters saved under that name instead of ``model.*``)
        self.model_spec: Optional[ModelSpec] = None if instance else model
        self.attn_implementation = attn_implementation
        if optimizer is None:
            raise ValueError("optimizer=None: the module needs an optimizer factory, e.g. torch.optim.AdamW (the default).")
        self.optimizer_factory = component_factory(optimizer, "optimizer")
        self.lr_scheduler_factory = component_factory(lr_scheduler, "lr_scheduler")
        self.gradient_checkpointing = gradient_checkpointing
        self.dtype_name = dtype
        self.seed = seed
        self.peft = peft
        self.trust_remote_code = trust_remote_code
        self.predict_output = predict_output
        self.freeze_vision_tower, self.freeze_projector = freeze_vision_tower, freeze_projector
        self.step_metrics: dict[str, torch.Tensor] = {}  # set by compute_loss of subclasses, logged per training step
        # what configure_model will build besides the trained model (memory="auto" counts their weights)
        self.frozen_specs: list[ModelSpec] = []
        self.model: Optional[torch.nn.Module] = None
        if instance:
            self._build(model)

    @override
    def setup(self, stage: str) -> None:
        # before configure_model, which runs inside the strategy's sharded context (see import_model_code)
        if self.model is None:
            for spec in (self.model_spec, *self.frozen_specs):  # the trained model and its frozen companions
                import_model_code(spec, self.trust_remote_code)

    @override
    @errors_reported_once
    def configure_model(self) -> None:
        if self.model is None:
            self._build(self.model_spec)

    def _build(self, spec: ModelSpec) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = build_causal_lm(spec, self.attn_implementation, self.dtype_name, self.trust_remote_code)
            freeze_vision(model, self.freeze_vision_tower, self.freeze_projector)
            if self.peft is not None:
                torch.manual_seed(self.seed)  # adapters start from `seed` however the model was built
                model = apply_peft(model, self.peft)
            # from_pretrained returns the model in eval mode, and Lightning keeps module modes as it finds them:
            # in eval mode HF layers skip gradient checkpointing (measured: 60.2 instead of ~40 GiB, 4 layers of
            # 8B width at 131K tokens) and dropout. Training starts in train mode (see also on_fit_start).
            self.model = model.train()

    @classmethod
    def frozen_model_specs(cls, init_args: dict[str, Any]) -> list[ModelSpec]:
        """The frozen companions (a reference, a teacher) a module of this class built from ``init_args`` (its
        ``__init__`` arguments, as in YAML) builds besides the trained model: none here. ``memory="auto"`` and
        ``lightning-ulysses plan`` count their weights."""
        return []

    def build_frozen(self, spec: ModelSpec) -> torch.nn.Module:
        """A frozen companion of the trained model (a reference, a teacher): built from ``spec`` (an instance is taken
        as it is) with this module's attention, dtype and seed -- so a config built the same way starts from the same
        weights on every rank -- without trainable parameters, in eval mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = spec if isinstance(spec, torch.nn.Module) else build_causal_lm(
                spec, self.attn_implementation, self.dtype_name, self.trust_remote_code)
        return model.requires_grad_(False).eval()

    # ---------------------------------------------------------------------------------- helpers
    def _prepare(self, batch: Any) -> dict[str, Any]:
        if torch.is_tensor(batch):
            batch = {"input_ids": batch}
        if "shift_labels" in batch and "position_ids" in batch:
            return batch  # already prepared (and sharded) by UlyssesDeepSpeedStrategy
        return prepare_batch(batch, pad_to_multiple_of=1)

    @override
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs).logits

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss of this rank's (shard of the) batch: the DP-group token mean (see :mod:`lightning_ulysses.parallel.loss`),
        plus the router's load-balancing term over whole sequences for MoE models that ask for it
        (``output_router_logits``, :mod:`lightning_ulysses.parallel.moe`)."""
        batch = self._prepare(batch)
        moe = moe_router_spec(find_hf_model(self.model))
        extra = {"output_router_logits": True} if moe else {}
        extra.update(checked_vision_inputs(batch))  # a vision-language batch: pixels, grids, slots, 3-D positions
        ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["shift_labels"]
        if tiled_loss_enabled(self.model):
            # SP-aware token mean computed in tiles inside the model (no logits tensor at all)
            out = self.model(input_ids=ids, position_ids=pos, shift_labels=labels, **extra)
            loss = out.loss
        else:
            out = self.model(input_ids=ids, position_ids=pos, use_cache=False, **extra)
            # the SP group and the token count come from the batch's step context (the strategy builds it where it
            # shards the batch); without one (any other strategy) the batch is whole and the group is None
            loss = sp_causal_lm_loss(out.logits, labels)
        if moe:
            experts, top_k, coef = moe
            ctx = step_context_for(labels)
            group, mask = (ctx.sp_group, ctx.token_mask) if ctx is not None else (None, None)
            aux = sp_load_balancing_loss(out.router_logits, experts, top_k, group, mask)
            loss = loss + coef * aux
        return loss, batch

    # ------------------------------------------------------------------------------- lightning
    @override
    def on_fit_start(self) -> None:
        # a model handed in as an instance may come in eval mode (from_pretrained's default); Lightning restores
        # whatever mode it finds after each validation, so this sets it once
        self.model.train()
        if self.gradient_checkpointing is not None:
            # the Trainer's one plan, with this module's request in it: under UlyssesDeepSpeedStrategy or trick
            # callbacks it is applied already (applying is idempotent); under any other strategy it is applied here
            apply_tricks(self.model, trainer_tricks(self.trainer))

    def requested_memory_tricks(self) -> dict[type, Optional[MemoryTrick]]:
        """What this module asks of the Trainer's memory plan (:func:`~lightning_ulysses.memory.trainer_tricks`):
        ``gradient_checkpointing=True`` adds :class:`GradientCheckpointing` (full) unless the plan has one,
        ``False`` removes it, ``None`` leaves the plan alone."""
        if self.gradient_checkpointing is None:
            return {}
        return {GradientCheckpointing: GradientCheckpointing() if self.gradient_checkpointing else None}

    @override
    def teardown(self, stage: str) -> None:
        # what on_fit_start applied under a strategy that does not remove tricks itself comes off again
        if self.gradient_checkpointing is not None and self.model is not None and self._trainer is not None:
            remove_tricks(self.model, trainer_tricks(self.trainer))

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, batch = self.compute_loss(batch)
        self._log_step_loss(loss.detach(), batch_idx, batch["input_ids"].shape[0])
        if self.step_metrics:  # what a subclass's loss reports besides itself (rewards/..., divergence, ...)
            self.log_dict(self.step_metrics, sync_dist=True, batch_size=1)
        return loss

    @override
    def train(self, mode: bool = True) -> "CausalLMModule":
        super().train(mode)
        # a frozen companion (a reference, a teacher: build_frozen) stays in eval mode, whatever mode Lightning sets
        for model in find_hf_models(self):
            if not any(p.requires_grad for p in model.parameters()):
                model.eval()
        return self

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

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, batch = self.compute_loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, batch = self.compute_loss(batch)
        self.log("test_loss", loss, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The whole sequence's outputs, gathered over the SP group and cut to the batch's own length (the strategy's
        padding removed), whatever the layout; what is returned is ``predict_output``'s (see the class)."""
        batch = self._prepare(batch)
        logits = self(batch["input_ids"], batch["position_ids"])  # this rank's [b, S/sp, V]
        ctx = step_context_for(batch["shift_labels"])
        length = ctx.input_length if ctx is not None and ctx.input_length is not None else logits.shape[1]
        gather = ctx.gather if ctx is not None else (lambda t: t)
        if self.predict_output == "token_logprobs":
            # log p(token t+1 | tokens <= t), computed on the shard, gathered as [b, S] (never [b, S, V])
            labels = batch["shift_labels"].to(logits.device)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return gather(logp.masked_fill(labels == IGNORE_INDEX, 0.0))[:, : length - 1]
        if self.predict_output == "last_logits":
            return self._last_logits(logits, ctx, batch)
        return gather(logits)[:, :length]

    def _last_logits(self, logits: torch.Tensor, ctx: Any, batch: dict) -> torch.Tensor:
        """``[b, V]`` logits at each row's last real token: taken on the rank that holds it, summed over the group."""
        b = logits.shape[0]
        if ctx is None or ctx.token_index is None:
            mask = batch.get("attention_mask")
            last = (mask.sum(1) - 1) if mask is not None else torch.full((b,), logits.shape[1] - 1)
            return logits[torch.arange(b), last.to(logits.device)]
        import torch.distributed as dist

        from lightning_ulysses.parallel.layout import rank_in_group

        mine = ctx.token_index[rank_in_group(ctx.sp_group)].to(logits.device)  # global index of each local token
        last = (ctx.real_lengths.to(logits.device) - 1)  # [b]
        hit = mine[None, :] == last[:, None]  # [b, S/sp]: at most one True per row, on one rank
        out = (logits * hit.unsqueeze(-1).to(logits.dtype)).sum(1)
        dist.all_reduce(out, group=ctx.sp_group)
        return out

    @override
    def configure_optimizers(self) -> Any:
        params = list(trainable_parameters(self))
        if not params:
            raise ValueError(
                "No parameter of the model requires grad, so there is nothing to train. With a PEFT model check the "
                "adapter config (target_modules); otherwise unfreeze some parameters."
            )
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


__all__ = ["CausalLMModule", "build_causal_lm", "component_factory"]
