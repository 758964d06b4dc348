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

Importing the package registers the ``"ulysses"`` strategy names with Lightning (:data:`STRATEGY_NAMES`), so
``Trainer(strategy="ulysses")`` works; everything else is imported when first used (``lightning_ulysses.TiledMLP``
imports :mod:`lightning_ulysses.memory`), so ``import lightning_ulysses.parallel`` loads neither the strategy nor
DeepSpeed. The root exports the names in ``__all__``; the memory tricks are exported from their registry
(:data:`lightning_ulysses.memory.plan.TRICKS`). Module paths of releases before the subpackages
(``lightning_ulysses.callbacks``, ``.layout``, ...) still import, as aliases of their new homes (:data:`MOVED`),
with a ``DeprecationWarning`` naming the new path.
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
import warnings as _warnings  # noqa: E402
from typing import Any as _Any  # noqa: E402

from lightning.pytorch.strategies import StrategyRegistry as _StrategyRegistry  # noqa: E402

__version__ = "0.1.0"

# the names Trainer(strategy=...) accepts -> (description, the strategy's arguments)
STRATEGY_NAMES: dict[str, tuple[str, dict[str, _Any]]] = {
    "ulysses": ("Ulysses sequence parallelism on DeepSpeed ZeRO-3 (sp auto)", {"stage": 3}),
    **{f"ulysses_stage_{stage}": (f"Ulysses sequence parallelism, ZeRO stage {stage}", {"stage": stage})
       for stage in (1, 2, 3)},
    "ulysses_stage_3_offload": (
        "Ulysses sequence parallelism, ZeRO-3 with optimizer and parameters offloaded to CPU",
        {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
    ),
}


def _build_strategy(**init_params: _Any) -> _Any:
    """The registry's factory: the strategy module is imported when a Trainer asks for one of the names."""
    from lightning_ulysses.lightning.strategy import UlyssesDeepSpeedStrategy

    return UlyssesDeepSpeedStrategy(**init_params)


for _name, (_description, _params) in STRATEGY_NAMES.items():
    if _name not in _StrategyRegistry:
        _StrategyRegistry.register(_name, _build_strategy, description=_description, **_params)

# public name -> the module that defines it (imported on first access; the memory tricks come from their registry)
_EXPORTS = {
    "CausalLMModule": "lightning.module",
    "build_causal_lm": "lightning.module",
    "UlyssesDeepSpeedStrategy": "lightning.strategy",
    "PreferenceModule": "lightning.preference",
    "DistillationModule": "lightning.distillation",
    "sequence_logprobs": "parallel.logprobs",
    "token_logprobs": "parallel.logprobs",
    "MemoryTrick": "memory.trick",
    "apply_tricks": "memory.trick",
    "ParallelLayout": "parallel.layout",
    "ProcessGroups": "parallel.layout",
    "exit_distributed": "parallel.layout",
    "shutdown_distributed": "parallel.layout",
    "count_valid_tokens": "parallel.loss",
    "deepspeed_loss_scale": "parallel.loss",
    "sp_causal_lm_loss": "parallel.loss",
    "sp_token_mean": "parallel.loss",
    "prepare_batch": "parallel.sharding",
    "shard_batch": "parallel.sharding",
    "shard_for_sequence_parallel": "parallel.sharding",
    "apply_ulysses": "parallel.ulysses",
    "remove_ulysses": "parallel.ulysses",
    # function forms of the tricks (the MemoryTrick classes are what the strategy and callbacks take)
    **{f"{verb}_{name}": f"memory.{module}" for module, names in {
        "offload": ("activation_offload",), "rmsnorm": ("memory_efficient_rmsnorm",),
        "swiglu": ("memory_efficient_swiglu",), "tiled_attention": ("tiled_attention",), "tiled_loss": ("tiled_loss",),
        "tiled_mlp": ("tiled_mlp",)}.items() for name in names for verb in ("enable", "disable")},
}


def _trick_classes() -> dict[str, type]:
    from lightning_ulysses.memory.plan import TRICKS

    return {kind.__name__: kind for kind in TRICKS}


def __getattr__(name: str) -> _Any:
    if name == "__all__":
        return sorted([*_EXPORTS, *_trick_classes()])
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif not name.startswith("_") and name in _trick_classes():
        value = _trick_classes()[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__getattr__("__all__")))


# old module path -> new one (imports of the old path give the new module itself, with a DeprecationWarning)
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
    "memory.checkpointing": "memory.activation_checkpoint",
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
        old = spec.name.partition(".")[2]
        _warnings.warn(
            f"{spec.name} is deprecated and will be removed; import {__name__}.{MOVED[old]} instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        module = _importlib.import_module(f"{__name__}.{MOVED[old]}")
        spec.loader_state = module.__spec__  # the import system sets module.__spec__ to the alias's; restored below
        return module

    def exec_module(self, module) -> None:  # type: ignore[override]
        # already executed under its new name; it keeps its own spec (reload, pickling by name)
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(f, _MovedModules) for f in _sys.meta_path):
    _sys.meta_path.append(_MovedModules())
