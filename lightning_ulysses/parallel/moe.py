"""Mixture-of-experts: the router's load-balancing loss over whole sequences under sequence parallelism.

transformers' MoE families (Qwen3-MoE, Mixtral, ...) add ``router_aux_loss_coef * aux`` to the loss, with
``aux`` the Switch-Transformer balance term ``E * sum_e f_e * P_e``: ``f_e`` the share of (top-k) routing
assignments to expert ``e`` and ``P_e`` the mean router probability of ``e``, both over every token of the
batch. It is not a sum over tokens, so the mean of per-shard values is not it. Here ``f`` and ``P`` are summed
over the SP group (one all-reduce of ``2E + 1`` numbers per layer stack): the value is the whole sequence's,
and each rank's gradient flows through its own tokens' probabilities only, so the SP group's summed gradient is
the whole sequence's -- the same construction as :func:`lightning_ulysses.parallel.loss.sp_token_mean`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def moe_router_spec(model: torch.nn.Module) -> Optional[tuple[int, int, float]]:
    """``(num_experts, top_k, router_aux_loss_coef)`` when the model returns router logits for an aux loss."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if not getattr(text, "output_router_logits", False):
        return None
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    top_k = getattr(text, "num_experts_per_tok", None)
    if not experts or not top_k:
        return None
    return int(experts), int(top_k), float(getattr(text, "router_aux_loss_coef", 0.0))


def sp_load_balancing_loss(
    router_logits: Sequence[Tensor],
    num_experts: int,
    top_k: int,
    group: Optional[dist.ProcessGroup] = None,
    token_mask: Optional[Tensor] = None,
) -> Tensor:
    """HF's ``load_balancing_loss_func`` over the whole sequences of an SP group.

    ``router_logits``: one ``[tokens, E]`` tensor per MoE layer for this rank's shard; ``token_mask``: the
    shard's real (non-padding) tokens, ``[b, c]`` (``None``: all).
    """
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    mask = token_mask.reshape(-1).to(device=device, dtype=torch.float32) if token_mask is not None else None
    for layer in router_logits:
        weights = torch.softmax(layer.float(), dim=-1)  # [tokens, E]
        selected = torch.topk(weights, top_k, dim=-1).indices  # [tokens, k]
        m = mask if mask is not None else torch.ones(weights.shape[0], device=device)
        counts = counts + torch.zeros(num_experts, device=device).scatter_add_(
            0, selected.reshape(-1), m.repeat_interleave(top_k)
        )
        probs = probs + (weights * m.unsqueeze(-1)).sum(dim=0)
        rows = rows + m.sum()
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        stats = torch.cat([counts, rows.reshape(1), probs.detach()])  # [2E + 1]
        dist.all_reduce(stats, group=group)
        counts, rows = stats[:num_experts], stats[num_experts]
        probs = probs + (stats[num_experts + 1 :] - probs.detach())  # value: group sum; gradient: own tokens
    rows = rows.clamp(min=1.0)
    return num_experts * torch.sum((counts / rows) * (probs / rows))


__all__ = ["moe_router_spec", "sp_load_balancing_loss"]
