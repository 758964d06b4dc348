"""``PreferenceModule``: DPO (sigmoid), IPO and SimPO on long sequences, under any layout of the strategy.

Batch layout (what :class:`lightning_ulysses.data.PreferenceDataModule` writes): the batch's samples, read row by row
and, inside a row, packed sample by packed sample (position ids restarting at 0), alternate chosen, rejected, chosen,
... -- so a pair is one packed row (one forward for both) or two consecutive rows. Prompt tokens carry label -100.

Per sample, the policy's log-probability sums over the completion come from
:func:`lightning_ulysses.parallel.logprobs.sequence_logprobs` (summed over the SP group, logits in tiles through the
lm_head); the reference's the same way under ``torch.no_grad``. The reference is, in order: the batch's own
``ref_chosen_logps`` / ``ref_rejected_logps`` (precomputed, ``[b, pairs per row]`` or ``[pairs]``); a ``ref_model``
given (a hub name, directory, config or instance, frozen); for a LoRA policy the same model with its adapters
disabled (no second copy, as TRL does); otherwise a frozen copy built the same way as the policy (same name / config and
seed, so the same initial weights). The reference is a submodule: ZeRO-3 partitions it like the policy (no optimizer
state: it has no trainable parameter) and the strategy runs it under the same Ulysses/ring attention.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from typing_extensions import override

from lightning_ulysses.alignment.losses import PREFERENCE_LOSSES, preference_loss
from lightning_ulysses.lightning.module import CausalLMModule
from lightning_ulysses.models.adapters import is_peft_model
from lightning_ulysses.models.build import ModelSpec, model_record
from lightning_ulysses.parallel.layout import rank_in_group
from lightning_ulysses.parallel.logprobs import DEFAULT_TILE_TOKENS, sequence_logprobs
from lightning_ulysses.parallel.sharding import packed_segments
from lightning_ulysses.parallel.step_context import step_context_for


class PreferenceModule(CausalLMModule):
    """Preference optimisation of an HF causal LM (TRL's losses and metric names).

    Args:
        model: the policy, as :class:`~lightning_ulysses.CausalLMModule` takes it (also ``peft=...`` for LoRA).
        ref_model: the reference (hub name, directory, config dict, ``PretrainedConfig`` or instance); ``None``: see the
            module docstring. Ignored by ``loss_type="simpo"`` (reference-free).
        loss_type: ``"sigmoid"`` (DPO), ``"ipo"`` or ``"simpo"`` (:mod:`lightning_ulysses.alignment.losses`).
        beta: the KL / reward scale.
        label_smoothing: conservative DPO / SimPO (``0``: off).
        simpo_gamma: SimPO's target margin ``gamma`` (the loss uses ``gamma / beta``, as TRL).
        logprob_tile_tokens: tokens per lm_head tile when computing log-probs.
        precomputed_ref_logps: the data carries the reference's log-probs (``ref_chosen_logps`` /
            ``ref_rejected_logps``, see :class:`~lightning_ulysses.data.PreferenceDataModule`): no reference model is
            built, and a batch without them is an error. Without this option such columns are still used when
            present, but a reference is built (and held) for batches without them.
        **kwargs: everything else of :class:`~lightning_ulysses.CausalLMModule` (optimizer, peft, dtype, ...).
    """

    def __init__(
        self,
        model: ModelSpec = "HuggingFaceTB/SmolLM2-135M",
        ref_model: Optional[ModelSpec] = None,
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        logprob_tile_tokens: int = DEFAULT_TILE_TOKENS,
        precomputed_ref_logps: bool = False,
        **kwargs: Any,
    ) -> None:
        if loss_type not in PREFERENCE_LOSSES:
            raise ValueError(f"loss_type must be one of {list(PREFERENCE_LOSSES)}, got {loss_type!r}.")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}.")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}.")
        if precomputed_ref_logps and ref_model is not None:
            raise ValueError("precomputed_ref_logps=True takes the reference's log-probs from the data: give no "
                             "ref_model (or drop the option to run ref_model).")
        from transformers import PreTrainedModel

        # an instance policy without a reference: its frozen copy is taken now, before training changes it
        if (ref_model is None and loss_type != "simpo" and not precomputed_ref_logps and isinstance(model, PreTrainedModel)
                and kwargs.get("peft") is None):
            ref_model = copy.deepcopy(model)
        super().__init__(model, **kwargs)
        self.hparams["ref_model"] = model_record(ref_model) if ref_model is not None else None
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.simpo_gamma, self.logprob_tile_tokens = simpo_gamma, logprob_tile_tokens
        self.precomputed_ref_logps = precomputed_ref_logps
        self._ref_source = (ref_model,)  # in a tuple: an instance must not be registered as a second submodule here
        self.frozen_specs = self.frozen_model_specs(
            {"model": model, "ref_model": ref_model, "loss_type": loss_type, "peft": kwargs.get("peft"),
             "precomputed_ref_logps": precomputed_ref_logps})
        self.ref_model: Optional[torch.nn.Module] = None

    @override
    def setup(self, stage: str) -> None:
        normalization = getattr(getattr(self.trainer, "strategy", None), "loss_normalization", "batch_mean")
        if normalization != "batch_mean":
            raise ValueError(
                f"loss_normalization={normalization!r} weighs every token of a step alike; preference losses are means "
                "over pairs (TRL's definition), which this option would not change. Use the strategy's default "
                "loss_normalization='batch_mean' (accumulated micro-batches then weigh equally)."
            )
        super().setup(stage)

    @classmethod
    @override
    def frozen_model_specs(cls, init_args: dict[str, Any]) -> list[ModelSpec]:
        """The reference: ``ref_model``, else a copy of the policy; none for SimPO, precomputed reference log-probs or a
        LoRA policy (adapters off)."""
        if init_args.get("loss_type", "sigmoid") == "simpo" or init_args.get("precomputed_ref_logps"):
            return []
        if init_args.get("ref_model") is not None:
            return [init_args["ref_model"]]
        model = init_args.get("model", "HuggingFaceTB/SmolLM2-135M")
        return [] if init_args.get("peft") is not None or is_peft_model(model) else [model]

    @override
    def configure_model(self) -> None:
        super().configure_model()
        if self.ref_model is not None or self.loss_type == "simpo" or self.precomputed_ref_logps:
            return
        spec = self._ref_source[0]
        if spec is None and (self.peft is not None or is_peft_model(self.model)):
            return  # LoRA: the policy with its adapters disabled is the reference
        # the same seed as the policy: a config-built copy starts from its weights
        ref = self.build_frozen(spec if spec is not None else self.model_spec)
        ours, theirs = self.model.get_output_embeddings().out_features, ref.get_output_embeddings().out_features
        if ours != theirs:
            raise ValueError(f"The reference model's vocabulary ({theirs}) differs from the policy's ({ours}); the "
                             "reference must score the same tokens: use the policy's own base checkpoint.")
        self.ref_model = ref

    # ---------------------------------------------------------------------------------------------- loss
    def sample_logprobs(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logps, tokens)`` of every sample of the batch (row by row, packed sample by sample): ``[samples]``."""
        ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["shift_labels"]
        hidden = model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        ctx = step_context_for(labels)
        group = ctx.sp_group if ctx is not None else None
        segments = ctx.segments if ctx is not None else packed_segments(pos)  # [b, S], whole sequences
        local, n = None, None
        if segments is not None:
            n = int(segments.max()) + 1
            local = segments
            if ctx is not None and ctx.token_index is not None:  # this rank's tokens of the whole sequences
                local = segments[:, ctx.token_index[rank_in_group(group)].to(segments.device)]
        logps, counts = sequence_logprobs(hidden, labels, model.get_output_embeddings(), group=group,
                                          segment_ids=local, num_segments=n, tile_tokens=self.logprob_tile_tokens)
        return logps.reshape(-1), counts.reshape(-1)

    def _reference_logprobs(self, batch: dict) -> Optional[torch.Tensor]:
        if self.loss_type == "simpo":
            return None
        with torch.no_grad():
            if self.ref_model is not None:
                return self.sample_logprobs(self.ref_model, batch)[0]
            with self.model.disable_adapter():  # LoRA policy: the base model is the reference
                return self.sample_logprobs(self.model, batch)[0]

    @override
    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = self._prepare(batch)
        logps, tokens = self.sample_logprobs(self.model, batch)
        if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
            ref = torch.stack([batch["ref_chosen_logps"].reshape(-1), batch["ref_rejected_logps"].reshape(-1)], 1)
            ref = ref.reshape(-1).to(logps)
            ref = torch.cat([ref, ref.new_zeros(max(0, logps.numel() - ref.numel()))])
        elif self.precomputed_ref_logps and self.loss_type != "simpo":
            raise ValueError("precomputed_ref_logps=True but the batch has no 'ref_chosen_logps' / 'ref_rejected_logps': "
                             "give data with both columns (PreferenceDataModule carries them), or drop the option.")
        else:
            ref = self._reference_logprobs(batch)
        # samples alternate chosen, rejected; slots of a row without a sample (fewer pairs than others) have no token
        chosen, rejected = slice(0, None, 2), slice(1, None, 2)
        keep = (tokens[chosen] > 0) & (tokens[rejected] > 0)
        if not bool(keep.any()):
            raise ValueError("The batch holds no complete preference pair (chosen and rejected, each with completion "
                             "tokens); see PreferenceModule's batch layout.")
        out = preference_loss(
            self.loss_type, logps[chosen][keep], logps[rejected][keep], tokens[chosen][keep], tokens[rejected][keep],
            ref[chosen][keep] if ref is not None else None, ref[rejected][keep] if ref is not None else None,
            beta=self.beta, label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma,
        )
        self.step_metrics = out.metrics(logps[chosen][keep], logps[rejected][keep])
        return out.loss, batch

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        self.log("val_loss", loss, sync_dist=True, batch_size=1)
        self.log_dict({f"val_{k}": v for k, v in self.step_metrics.items()}, sync_dist=True, batch_size=1)
        return loss


__all__ = ["PreferenceModule"]
