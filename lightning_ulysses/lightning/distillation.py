"""``DistillationModule``: a student learns a frozen teacher's next-token distributions on long sequences, under any
layout of the strategy.

Both models run on this rank's shard of the batch (the teacher without autograd, under the same Ulysses/ring attention:
the strategy applies it to every HF model of the module); their lm_heads run in token tiles
(:func:`lightning_ulysses.alignment.distillation.tiled_distillation_sums`), so neither ``[S, V]`` distribution is ever
whole. The loss is the token mean over the labelled tokens of the whole sequences (SP group), as the causal-LM loss
(:func:`lightning_ulysses.parallel.loss.normalize_sp_loss`): ``(1 - ce_weight) * divergence + ce_weight * CE``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from typing_extensions import override

from lightning_ulysses.alignment.distillation import DIVERGENCES, tiled_distillation_sums
from lightning_ulysses.lightning.module import CausalLMModule
from lightning_ulysses.models.build import ModelSpec, model_record
from lightning_ulysses.parallel.loss import normalize_sp_loss


class DistillationModule(CausalLMModule):
    """Distil ``teacher`` into ``student`` (TRL GKD's divergences).

    Args:
        student: the model trained, as :class:`~lightning_ulysses.CausalLMModule`'s ``model`` (also ``peft=...``).
        teacher: hub name, directory, config dict, ``PretrainedConfig`` or instance; frozen, same vocabulary.
        divergence: ``"forward_kl"`` (``KL(teacher || student)``), ``"reverse_kl"`` or ``"jsd"`` (generalized JSD
            with ``jsd_beta``).
        jsd_beta: the mixture weight of ``"jsd"`` (TRL GKD's ``beta``), in (0, 1).
        temperature: both distributions are ``softmax(logits / temperature)``.
        ce_weight: share of the student's next-token cross-entropy in the loss (``0``: divergence only).
        logprob_tile_tokens: tokens per lm_head tile.
        **kwargs: everything else of :class:`~lightning_ulysses.CausalLMModule`.
    """

    def __init__(
        self,
        student: ModelSpec = "HuggingFaceTB/SmolLM2-135M",
        teacher: ModelSpec = "HuggingFaceTB/SmolLM2-360M",
        divergence: str = "forward_kl",
        jsd_beta: float = 0.5,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        logprob_tile_tokens: int = 2048,
        **kwargs: Any,
    ) -> None:
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {divergence!r}.")
        if divergence == "jsd" and not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta!r} (0 is forward_kl, 1 is reverse_kl).")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        if not 0.0 <= ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight!r}.")
        super().__init__(student, **kwargs)
        self.hparams["teacher"] = model_record(teacher)
        self.divergence, self.jsd_beta, self.temperature = divergence, jsd_beta, temperature
        self.ce_weight, self.logprob_tile_tokens = ce_weight, logprob_tile_tokens
        self._teacher_source = (teacher,)  # in a tuple: an instance must not be registered as a second submodule here
        self.frozen_specs = self.frozen_model_specs({"teacher": teacher})
        self.teacher: Optional[torch.nn.Module] = None

    @classmethod
    @override
    def frozen_model_specs(cls, init_args: dict[str, Any]) -> list[ModelSpec]:
        """The teacher."""
        return [init_args.get("teacher", "HuggingFaceTB/SmolLM2-360M")]

    @override
    def configure_model(self) -> None:
        super().configure_model()
        if self.teacher is not None:
            return
        teacher = self.build_frozen(self._teacher_source[0])
        student_vocab = self.model.get_output_embeddings().out_features
        teacher_vocab = teacher.get_output_embeddings().out_features
        if student_vocab != teacher_vocab:
            raise ValueError(f"The teacher's vocabulary ({teacher_vocab}) differs from the student's ({student_vocab}); "
                             "token-level distillation needs the same tokenizer.")
        self.teacher = teacher

    @override
    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = self._prepare(batch)
        ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["shift_labels"]
        hidden = self.model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        with torch.no_grad():
            teacher_hidden = self.teacher.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        div, ce = tiled_distillation_sums(
            hidden, teacher_hidden, labels, self.model.get_output_embeddings(), self.teacher.get_output_embeddings(),
            divergence=self.divergence, beta=self.jsd_beta, temperature=self.temperature,
            tile_tokens=self.logprob_tile_tokens,
        )
        local = (1 - self.ce_weight) * div + self.ce_weight * ce
        self.step_metrics = {"divergence": normalize_sp_loss(div.detach(), labels),
                         "student_ce": normalize_sp_loss(ce.detach(), labels)}
        return normalize_sp_loss(local, labels), batch


__all__ = ["DistillationModule"]
