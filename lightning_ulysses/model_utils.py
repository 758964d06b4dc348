"""Finding the Hugging Face model inside a LightningModule and reading what SP needs from it."""

from __future__ import annotations

from typing import Optional

import torch


def find_hf_model(module: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The outermost ``transformers.PreTrainedModel`` in ``module`` (itself included), or None."""
    from transformers import PreTrainedModel

    for m in module.modules():
        if isinstance(m, PreTrainedModel):
            return m
    return None


def attention_spec(model: torch.nn.Module) -> tuple[int, int, Optional[str]]:
    """``(num_attention_heads, num_key_value_heads, attn_implementation)`` of an HF model."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return heads, kv, getattr(cfg, "_attn_implementation", None)


def checkpoint_kwargs() -> dict:
    """Non-reentrant checkpointing (transformers 5's default) with torch's *early stop* left on.

    Early stop must stay on under ZeRO-3: with ``early_stop=False`` the recompute runs past the point
    where DeepSpeed expects it to end and meets released (size-0) parameters (measured on CPU with
    DeepSpeed 0.19.8). On torch 2.11 we once saw early stop fail when the last tensor of a layer is
    saved by a custom autograd Function (``SystemError: ... returned NULL without setting an
    exception``, in ``benchmarks/memory_peak.py`` only; the same stack ran in every ablation run).
    """
    return {"use_reentrant": False}


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """HF gradient checkpointing of every decoder layer with :func:`checkpoint_kwargs` (idempotent)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs())
