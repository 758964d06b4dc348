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
