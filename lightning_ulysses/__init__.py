"""Ulysses sequence parallelism for Hugging Face causal LMs in PyTorch Lightning, on DeepSpeed.

Subpackages (each concern in one place; ``tests/test_architecture.py`` checks the module graph has no cycles):

* :mod:`lightning_ulysses.parallel` -- the SP core: layout and groups, sharding, step context, Ulysses, ring, loss
* :mod:`lightning_ulysses.memory` -- the memory tricks (one ``MemoryTrick`` class each) and their plan
* :mod:`lightning_ulysses.kernels` -- attention kernels and the hook into transformers' attention interface
* :mod:`lightning_ulysses.lightning` -- the Lightning surface: strategy, module, callbacks, CLI
* :mod:`lightning_ulysses.models` -- reading HF models (heads, shardability), adapters, FLOP formulas
* :mod:`lightning_ulysses.data` -- data modules
* :mod:`lightning_ulysses.checkpoint` -- complete-or-absent saves, mid-epoch resume, resume at another layout,
  full weights gathered for export
* :mod:`lightning_ulysses.compat` -- every private API of Lightning, DeepSpeed, transformers and torch we use
* :mod:`lightning_ulysses.tools` -- command-line tools (``compare``, ``export``)

Importing the package registers the ``"ulysses"`` strategy names with Lightning, so ``Trainer(strategy="ulysses")``
works. Module paths of releases before the subpackages (``lightning_ulysses.callbacks``, ``.layout``, ...) still
import, as aliases of their new homes (:data:`MOVED`).
"""

import os as _os

import torch as _torch

# Import-time side effect, kept on purpose: DeepSpeed picks its accelerator once, at the first
# `deepspeed.accelerator.get_accelerator()`, which importing transformers' or Lightning's DeepSpeed integration can
# trigger before any of our code runs; on a machine without CUDA it must be the CPU one (a user's setting wins).
if not _torch.cuda.is_available():
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")

import importlib as _importlib  # noqa: E402
import importlib.abc as _importlib_abc  # noqa: E402
import importlib.util as _importlib_util  # noqa: E402
import sys as _sys  # noqa: E402

from lightning.pytorch.strategies import StrategyRegistry as _StrategyRegistry  # noqa: E402

from lightning_ulysses.lightning.module import CausalLMModule, build_causal_lm  # noqa: E402
from lightning_ulysses.lightning.strategy import UlyssesDeepSpeedStrategy  # noqa: E402
from lightning_ulysses.memory import (  # noqa: E402
    ActivationOffload,
    GradientCheckpointing,
    MemoryEfficientRMSNorm,
    MemoryEfficientSwiGLU,
    MemoryTrick,
    TiledAttentionBackward,
    TiledLoss,
    TiledMLP,
    apply_tricks,
)
from lightning_ulysses.memory.offload import disable_activation_offload, enable_activation_offload  # noqa: E402
from lightning_ulysses.memory.rmsnorm import disable_memory_efficient_rmsnorm, enable_memory_efficient_rmsnorm  # noqa: E402
from lightning_ulysses.memory.swiglu import disable_memory_efficient_swiglu, enable_memory_efficient_swiglu  # noqa: E402
from lightning_ulysses.memory.tiled_attention import disable_tiled_attention, enable_tiled_attention  # noqa: E402
from lightning_ulysses.memory.tiled_loss import disable_tiled_loss, enable_tiled_loss  # noqa: E402
from lightning_ulysses.memory.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp  # noqa: E402
from lightning_ulysses.parallel.layout import ParallelLayout, ProcessGroups, exit_distributed, shutdown_distributed  # noqa: E402
from lightning_ulysses.parallel.loss import count_valid_tokens, deepspeed_loss_scale, sp_causal_lm_loss, sp_token_mean  # noqa: E402
from lightning_ulysses.parallel.sharding import prepare_batch, shard_batch, shard_for_sequence_parallel  # noqa: E402
from lightning_ulysses.parallel.ulysses import apply_ulysses, remove_ulysses  # noqa: E402

if "ulysses" not in _StrategyRegistry:
    UlyssesDeepSpeedStrategy.register_strategies(_StrategyRegistry)

__version__ = "0.1.0"

# old module path -> new one (imports of the old path give the new module itself)
MOVED = {
    "accumulation": "parallel.accumulation",
    "adapters": "models.adapters",
    "allocator": "memory.allocator",
    "attention": "parallel.ulysses",
    "attention_kernels": "kernels.attention",
    "callbacks": "lightning.callbacks",
    "cli": "lightning.cli",
    "compare": "tools.compare",
    "cpu": "lightning.cpu",
    "datasets": "data.synthetic",
    "layout": "parallel.layout",
    "loss": "parallel.loss",
    "model_utils": "models.inspect",
    "module": "lightning.module",
    "module_swap": "memory.module_swap",
    "moe": "parallel.moe",
    "offload": "memory.offload",
    "ring": "parallel.ring",
    "rmsnorm": "memory.rmsnorm",
    "step_context": "parallel.step_context",
    "strategy": "lightning.strategy",
    "swiglu": "memory.swiglu",
    "throughput": "models.flops",
    "tiled_attention": "memory.tiled_attention",
    "tiled_loss": "memory.tiled_loss",
    "tiled_mlp": "memory.tiled_mlp",
    "zero_config": "memory.zero_config",
}


class _MovedModules(_importlib_abc.MetaPathFinder, _importlib_abc.Loader):
    """Resolves ``lightning_ulysses.<old name>`` to the module's new home (same module object)."""

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[override]
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in MOVED:
            return None
        return _importlib_util.spec_from_loader(fullname, self)

    def create_module(self, spec):  # type: ignore[override]
        return _importlib.import_module(f"{__name__}.{MOVED[spec.name.partition('.')[2]]}")

    def exec_module(self, module) -> None:  # type: ignore[override]
        pass  # already executed under its new name


if not any(isinstance(f, _MovedModules) for f in _sys.meta_path):
    _sys.meta_path.append(_MovedModules())

__all__ = [
    "ActivationOffload",
    "CausalLMModule",
    "GradientCheckpointing",
    "MemoryEfficientRMSNorm",
    "MemoryEfficientSwiGLU",
    "MemoryTrick",
    "ParallelLayout",
    "ProcessGroups",
    "TiledAttentionBackward",
    "TiledLoss",
    "TiledMLP",
    "UlyssesDeepSpeedStrategy",
    "apply_tricks",
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
    "exit_distributed",
    "shutdown_distributed",
]
