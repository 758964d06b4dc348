"""Ulysses sequence parallelism for Hugging Face causal LMs in PyTorch Lightning, on DeepSpeed.

Importing the package registers the ``"ulysses"`` strategy names with Lightning, so
``Trainer(strategy="ulysses")`` works, and on a machine without CUDA selects DeepSpeed's CPU
accelerator (must happen before DeepSpeed is imported).
"""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")

from lightning_ulysses.allocator import set_expandable_segments as _set_expandable_segments  # noqa: E402

_set_expandable_segments()

from lightning.pytorch.strategies import StrategyRegistry as _StrategyRegistry  # noqa: E402

from lightning_ulysses.attention import apply_ulysses, remove_ulysses  # noqa: E402
from lightning_ulysses.data import prepare_batch, shard_batch, shard_for_sequence_parallel  # noqa: E402
from lightning_ulysses.layout import ParallelLayout, ProcessGroups, shutdown_distributed  # noqa: E402
from lightning_ulysses.loss import count_valid_tokens, deepspeed_loss_scale, sp_causal_lm_loss, sp_token_mean  # noqa: E402
from lightning_ulysses.module import CausalLMModule, build_causal_lm  # noqa: E402
from lightning_ulysses.offload import disable_activation_offload, enable_activation_offload  # noqa: E402
from lightning_ulysses.rmsnorm import disable_memory_efficient_rmsnorm, enable_memory_efficient_rmsnorm  # noqa: E402
from lightning_ulysses.swiglu import disable_memory_efficient_swiglu, enable_memory_efficient_swiglu  # noqa: E402
from lightning_ulysses.tiled_attention import disable_tiled_attention, enable_tiled_attention  # noqa: E402
from lightning_ulysses.tiled_loss import disable_tiled_loss, enable_tiled_loss  # noqa: E402
from lightning_ulysses.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp  # noqa: E402
from lightning_ulysses.strategy import UlyssesDeepSpeedStrategy  # noqa: E402

if "ulysses" not in _StrategyRegistry:
    UlyssesDeepSpeedStrategy.register_strategies(_StrategyRegistry)

__version__ = "0.1.0"

__all__ = [
    "CausalLMModule",
    "ParallelLayout",
    "ProcessGroups",
    "UlyssesDeepSpeedStrategy",
    "apply_ulysses",
    "build_causal_lm",
    "count_valid_tokens",
    "deepspeed_loss_scale",
    "disable_activation_offload",
    "disable_memory_efficient_rmsnorm",
    "disable_memory_efficient_swiglu",
    "disable_tiled_attention",
    "disable_tiled_loss",
    "disable_tiled_mlp",
    "enable_activation_offload",
    "enable_memory_efficient_rmsnorm",
    "enable_memory_efficient_swiglu",
    "enable_tiled_attention",
    "enable_tiled_loss",
    "enable_tiled_mlp",
    "prepare_batch",
    "remove_ulysses",
    "shard_batch",
    "shard_for_sequence_parallel",
    "sp_causal_lm_loss",
    "sp_token_mean",
    "shutdown_distributed",
]
