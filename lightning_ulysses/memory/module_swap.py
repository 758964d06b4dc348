"""Per-instance behaviour changes by class swap, shared by the memory tricks.

Each trick (tiled loss head, tiled MLP, memory-efficient RMSNorm) must run *inside its module's
forward* so that ZeRO-3 gathers that module's parameters the usual way, and must touch only the model
it is applied to. Swapping the instance's ``__class__`` for a cached subclass of its own class does
both: hooks, parameters and state-dict keys stay as they are, other instances are untouched, and
restoring the original class undoes it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

_ORIGINAL = "_lightning_ulysses_original_class"
_SETTINGS = "_lightning_ulysses"  # instance attribute: the tricks' settings of one module, a dict
_KIND = "_lightning_ulysses_kind"
_CACHE: dict[tuple[str, type], type] = {}


def settings(module: torch.nn.Module) -> dict:
    """The memory tricks' settings on one module instance (one dict, keyed by setting name), created on first use.
    Stored in the instance ``__dict__``: invisible to ``state_dict``, untouched by class swaps."""
    found = module.__dict__.get(_SETTINGS)
    if found is None:
        found = module.__dict__[_SETTINGS] = {}
    return found


def forget_settings(model: torch.nn.Module) -> None:
    """Drop every module's settings dict (once no trick is applied: what teardown leaves is the plain model)."""
    for m in model.modules():
        m.__dict__.pop(_SETTINGS, None)


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


def swapped_kind(module: torch.nn.Module) -> Optional[str]:
    return getattr(type(module), _KIND, None)


def is_swapped(module: torch.nn.Module, kind: str) -> bool:
    return swapped_kind(module) == kind


def restore_class(module: torch.nn.Module, kind: str) -> None:
    if is_swapped(module, kind):
        module.__class__ = getattr(type(module), _ORIGINAL)


def any_swapped(model: torch.nn.Module, kind: str) -> bool:
    return any(is_swapped(m, kind) for m in model.modules())


# ---- an MLP's "inner" forward: how one MLP computes ``y = mlp(x)`` when a trick replaces its math (the fused
# SwiGLU) while another trick may own the class swap (the tiled MLP calls it once per tile). The inner forward
# is an instance attribute ``(fn, kind)``, so the two tricks never need to know about each other.
_INNER = "inner_forward"


def _inner_subclass(cls: type) -> type:
    class Sub(cls):  # type: ignore[misc, valid-type]
        def forward(self, x, *args, **kwargs):
            if args or kwargs:
                return super().forward(x, *args, **kwargs)
            return settings(self)[_INNER][0](self, x)

    return Sub


def set_inner_forward(module: torch.nn.Module, fn: Optional[Callable], kind: str) -> None:
    """Give ``module`` the inner forward ``fn(module, x)`` of trick ``kind`` (``fn=None`` removes it). Swaps its
    class to the ``kind`` subclass whose ``forward`` calls it, unless another trick's class already owns
    ``forward`` (and calls :func:`inner_forward`)."""
    if fn is not None:
        settings(module)[_INNER] = (fn, kind)
        if swapped_kind(module) is None:
            swap_class(module, kind, _inner_subclass)
    else:
        settings(module).pop(_INNER, None)
        restore_class(module, kind)


def inner_forward(module: torch.nn.Module, x: Any, plain: Callable) -> Any:
    """``module``'s inner forward on ``x`` if it has one, else ``plain(x)`` (the original class's forward)."""
    inner = settings(module).get(_INNER)
    return inner[0](module, x) if inner is not None else plain(x)


def restore_with_inner(module: torch.nn.Module, kind: str) -> None:
    """Undo the ``kind`` swap; a module that still has an inner forward gets the class that calls it."""
    restore_class(module, kind)
    inner = settings(module).get(_INNER)
    if inner is not None and swapped_kind(module) is None:
        swap_class(module, inner[1], _inner_subclass)
