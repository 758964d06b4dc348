"""Per-instance behaviour changes by class swap, shared by the memory tricks.

Each trick (tiled loss head, tiled MLP, memory-efficient RMSNorm) must run *inside its module's
forward* so that ZeRO-3 gathers that module's parameters the usual way, and must touch only the model
it is applied to. Swapping the instance's ``__class__`` for a cached subclass of its own class does
both: hooks, parameters and state-dict keys stay as they are, other instances are untouched, and
restoring the original class undoes it.
"""

from __future__ import annotations

from typing import Callable

import torch

_ORIGINAL = "_lightning_ulysses_original_class"
_KIND = "_lightning_ulysses_kind"
_CACHE: dict[tuple[str, type], type] = {}


def swap_class(module: torch.nn.Module, kind: str, make: Callable[[type], type]) -> None:
    """Give ``module`` the ``kind`` subclass of its original class, built once by ``make(original)``."""
    original = getattr(type(module), _ORIGINAL, type(module))
    key = (kind, original)
    if key not in _CACHE:
        sub = make(original)
        setattr(sub, _ORIGINAL, original)
        setattr(sub, _KIND, kind)
        sub.__name__ = sub.__qualname__ = f"{kind}{original.__name__}"
        _CACHE[key] = sub
    module.__class__ = _CACHE[key]


def is_swapped(module: torch.nn.Module, kind: str) -> bool:
    return getattr(type(module), _KIND, None) == kind


def restore_class(module: torch.nn.Module, kind: str) -> None:
    if is_swapped(module, kind):
        module.__class__ = getattr(type(module), _ORIGINAL)


def any_swapped(model: torch.nn.Module, kind: str) -> bool:
    return any(is_swapped(m, kind) for m in model.modules())
