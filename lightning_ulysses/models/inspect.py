"""Finding the Hugging Face model inside a LightningModule and reading what SP needs from it."""

from __future__ import annotations

from typing import Optional

import torch

from lightning_ulysses.compat.transformers import attn_implementation


def find_hf_models(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Every outermost ``transformers.PreTrainedModel`` in ``module`` (itself included): the trained model and any
    frozen companion (a DPO reference, a distillation teacher), in registration order."""
    from transformers import PreTrainedModel

    found: list[torch.nn.Module] = []
    inner: set[int] = set()
    for m in module.modules():
        if isinstance(m, PreTrainedModel) and id(m) not in inner:
            found.append(m)
            inner.update(id(x) for x in m.modules())
    return found


def find_hf_model(module: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The trained ``transformers.PreTrainedModel`` in ``module``: the outermost one with a trainable parameter (a
    frozen reference or teacher next to it is not it), else the first one, or None."""
    models = find_hf_models(module)
    trained = [m for m in models if any(p.requires_grad for p in m.parameters())]
    return (trained or models or [None])[0]


# Layer kinds whose token mixing is not softmax attention over (q, k, v): a recurrence or convolution over the
# sequence that Ulysses cannot split (each rank would run it on its shard only, silently wrong).
_SEQUENTIAL_MIXERS = ("mamba", "linear_attention", "gateddeltanet", "gated_delta", "deltanet", "shortconv", "short_conv",
                      "conv", "ssm", "rwkv", "recurrent", "hybrid", "lightning_attention", "retention")


def check_shardable(model: torch.nn.Module, sp: int) -> None:
    """Refuse, with the reason, models whose sequence mixing sequence parallelism cannot shard.

    Looked for in the config's ``layer_types`` (transformers 5 names every layer's kind there) and in the
    module classes (Mamba / linear-attention / gated-delta-net mixers of SSM and hybrid families).
    """
    if sp <= 1:
        return
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    kinds = [str(k).lower() for k in (getattr(text, "layer_types", None) or [])]
    bad = sorted({k for k in kinds if any(s in k for s in _SEQUENTIAL_MIXERS)})
    names = sorted({type(m).__name__ for m in model.modules()
                    if any(s in type(m).__name__.lower() for s in ("mamba", "linearattention", "gateddeltanet", "shortconv", "rwkv"))})
    if bad or names:
        what = ", ".join(bad + names)
        raise ValueError(
            f"Sequence parallelism (sp={sp}) cannot shard {type(model).__name__}: its layers mix tokens with {what} "
            "(a recurrence or convolution over the whole sequence, not attention), which would run on each rank's "
            "shard alone. Train it with sequence_parallel_size=1, or use an attention-only model."
        )


def attention_spec(model: torch.nn.Module) -> tuple[int, int, Optional[str]]:
    """``(num_attention_heads, num_key_value_heads, attn_implementation)`` of an HF model."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return heads, kv, attn_implementation(cfg)


__all__ = ["attention_spec", "check_shardable", "find_hf_model", "find_hf_models"]
