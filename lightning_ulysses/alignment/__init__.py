"""Losses beyond next-token cross-entropy, as TRL defines them, on sequence log-probabilities computed under SP
(:func:`lightning_ulysses.parallel.logprobs.sequence_logprobs`): :mod:`.losses` (DPO sigmoid, IPO, SimPO).
No Lightning here; :class:`lightning_ulysses.PreferenceModule` trains with them."""

from lightning_ulysses.alignment.losses import PREFERENCE_LOSSES, PreferenceOutput, preference_loss

__all__ = ["PREFERENCE_LOSSES", "PreferenceOutput", "preference_loss"]
