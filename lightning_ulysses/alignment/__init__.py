"""Losses beyond next-token cross-entropy, as TRL defines them, on sequence log-probabilities computed under SP
(:func:`lightning_ulysses.parallel.logprobs.sequence_logprobs`): :mod:`.losses` (DPO sigmoid, IPO, SimPO), and
token-level distillation divergences in tiles (:mod:`.distillation`). No Lightning here;
:class:`lightning_ulysses.PreferenceModule` and :class:`lightning_ulysses.DistillationModule` train with them."""

from lightning_ulysses.alignment.distillation import DIVERGENCES, tiled_distillation_sums, token_divergence
from lightning_ulysses.alignment.losses import PREFERENCE_LOSSES, PreferenceOutput, preference_loss

__all__ = ["DIVERGENCES", "PREFERENCE_LOSSES", "PreferenceOutput", "preference_loss", "tiled_distillation_sums",
           "token_divergence"]
