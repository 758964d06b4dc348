"""Preference losses with TRL's definitions (``trl/trainer/dpo_trainer.py``, ``cpo_trainer.py`` for SimPO) and its
logged metrics. Inputs are per-pair sums of log-probs over the completion tokens (prompt tokens carry no label):

* ``"sigmoid"`` (DPO): ``logits = (pc - pr) - (rc - rr)``; loss ``-log sigmoid(beta logits)`` (with
  ``label_smoothing`` e: ``-(1-e) log sigmoid(beta logits) - e log sigmoid(-beta logits)``);
* ``"ipo"``: the same ``logits`` from length-normalised log-probs (mean over completion tokens, policy and reference;
  the rewards too); loss ``(logits - 1 / (2 beta))^2``;
* ``"simpo"`` (reference-free): ``logits = mean(pc) - mean(pr) - gamma / beta``; loss as sigmoid's.

``pc``/``pr``: the policy's log-probs of chosen/rejected, ``rc``/``rr``: the reference's. Rewards are
``beta (pc - rc)`` (SimPO: ``beta mean(pc)``), as TRL logs them under ``rewards/chosen`` etc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo")


@dataclass
class PreferenceOutput:
    """The loss (mean over pairs) and TRL's metrics, each ``[pairs]`` before averaging."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    def metrics(self, chosen_logps: Tensor, rejected_logps: Tensor) -> dict[str, Tensor]:
        return {
            "rewards/chosen": self.chosen_rewards.mean(),
            "rewards/rejected": self.rejected_rewards.mean(),
            "rewards/margins": (self.chosen_rewards - self.rejected_rewards).mean(),
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float().mean(),
            "logps/chosen": chosen_logps.detach().mean(),
            "logps/rejected": rejected_logps.detach().mean(),
        }


def preference_loss(
    loss_type: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PreferenceOutput:
    """The loss of ``[pairs]`` log-prob sums (``*_tokens``: the completion token counts); see the module docstring."""
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type must be one of {list(PREFERENCE_LOSSES)}, got {loss_type!r}.")
    if loss_type == "simpo":
        pc, pr = chosen_logps / chosen_tokens.clamp(min=1), rejected_logps / rejected_tokens.clamp(min=1)
        logits = pc - pr - simpo_gamma / beta
        loss = _sigmoid_loss(beta * logits, label_smoothing)
        return PreferenceOutput(loss.mean(), (beta * pc).detach(), (beta * pr).detach())
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type={loss_type!r} needs the reference model's log-probs.")
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if loss_type == "ipo":  # TRL averages policy and reference log-probs over the completion for IPO
        chosen_ratio, rejected_ratio = chosen_ratio / chosen_tokens.clamp(min=1), rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    else:
        loss = _sigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return PreferenceOutput(loss.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def _sigmoid_loss(x: Tensor, label_smoothing: float) -> Tensor:
    return -F.logsigmoid(x) * (1 - label_smoothing) - F.logsigmoid(-x) * label_smoothing


__all__ = ["PREFERENCE_LOSSES", "PreferenceOutput", "preference_loss"]
