"""The memory plans ``memory="auto"`` chooses from, fastest first: each is a set of the strategy's flat options
(:func:`lightning_ulysses.memory.plan.tricks_from_flags`), so a plan is exactly what a user could write by hand.

* ``no_checkpointing``: nothing recomputed; every layer's activations stay on the GPU until backward.
* ``save_attention``: selective checkpointing, attention outputs kept (attention never recomputed).
* ``save_attention+offload``: the same with the checkpointed layer inputs in host memory.
* ``save_attention+offload+tiled_mlp``: also the MLP in token tiles (its intermediates were the largest part of the
  backward's working set left: long sequences keep attention unrecomputed for the price of the tiled MLP's ~8%).
* ``full``: every layer recomputed in backward; layer inputs kept on the GPU.
* ``full+offload``: layer inputs in host memory.
* ``full+offload+tiled``: also the MLP and the attention backward in token tiles (the longest sequences).

Every plan has the tiled loss (logits never whole) and the memory-efficient RMSNorm / SwiGLU (no speed cost).
"""

from __future__ import annotations

from typing import Any

_COMMON = {"tiled_loss": True, "memory_efficient_rmsnorm": True, "memory_efficient_swiglu": True}

CANDIDATES: dict[str, dict[str, Any]] = {
    "no_checkpointing": {**_COMMON, "gradient_checkpointing": False},
    "save_attention": {**_COMMON, "gradient_checkpointing": True, "checkpoint_policy": "save_attention"},
    "save_attention+offload": {**_COMMON, "gradient_checkpointing": True, "checkpoint_policy": "save_attention",
                               "activation_checkpoint_cpu_offload": True},
    "save_attention+offload+tiled_mlp": {**_COMMON, "gradient_checkpointing": True,
                                         "checkpoint_policy": "save_attention",
                                         "activation_checkpoint_cpu_offload": True, "tiled_mlp": True},
    "full": {**_COMMON, "gradient_checkpointing": True},
    "full+offload": {**_COMMON, "gradient_checkpointing": True, "activation_checkpoint_cpu_offload": True},
    "full+offload+tiled": {**_COMMON, "gradient_checkpointing": True, "activation_checkpoint_cpu_offload": True,
                           "tiled_mlp": True, "tiled_attention_backward": True},
}

__all__ = ["CANDIDATES"]
