"""A full state dict written as a Hugging Face model directory (``save_pretrained``): what ``lightning-ulysses export``
and the ``HFExport`` callback both write."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch


def write_hf(  # long: 35 lines of one sequence: build on meta, load, tie, merge or name the base, cast, save
    weights: dict[str, torch.Tensor],
    config: Any,
    out_dir: str,
    adapters: Any = None,
    base: Optional[str] = None,
    tokenizer: Optional[str] = None,
    tokenizer_required: bool = False,
    max_shard_size: str = "5GB",
    dtype: Optional[str] = None,
    merge: bool = False,
) -> Path:
    """``save_pretrained`` of the model ``config`` describes holding ``weights`` (a full state dict, the HF model's
    own keys; with ``adapters``, the PEFT model's). The model is built on the meta device and takes the tensors as
    they are (no second copy). ``base``: the hub name/path adapters record as their base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_ulysses.compat.transformers import plain_model_init, tied_weight_keys

    with torch.device("meta"), plain_model_init():  # also called by rank 0 alone during a ZeRO-3 fit (HFExport)
        model = AutoModelForCausalLM.from_config(config)
        if adapters is not None:
            from lightning_ulysses.models.adapters import apply_peft

            model = apply_peft(model, adapters)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    tied = tied_weight_keys(model) | {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"The checkpoint does not match the model config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}. Pass the model it was trained from with --config.")
    if config.tie_word_embeddings:
        model.tie_weights()
    if adapters is not None:
        if merge:  # the base model with the adapters folded into its weights
            model = model.merge_and_unload()
        elif base is not None:  # adapters only: PeftModel.from_pretrained(base, OUT_DIR) finds the base
            for adapter_config in model.peft_config.values():
                adapter_config.base_model_name_or_path = base
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    out = Path(out_dir)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer is not None:
        try:
            AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
        except (OSError, ValueError):
            if tokenizer_required:
                raise
    return out


__all__ = ["write_hf"]
