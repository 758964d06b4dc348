"""The one hook into transformers' attention interface, scoped per model.

HF attention layers call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``. We wrap that global entry
(``sdpa``, ``flash_attention_2``...) once per process with a *dispatcher* that looks at the calling module for
two handlers:

* a sequence-parallel handler (:func:`set_sp_attention`; :mod:`lightning_ulysses.parallel.ulysses` installs
  :class:`~lightning_ulysses.parallel.ulysses.UlyssesAttention`), called as
  ``handler(core, module, q, k, v, mask, *args, **kwargs)``;
* a replacement of the local kernel (:func:`set_local_attention`; the tiled attention backward of
  :mod:`lightning_ulysses.memory.tiled_attention`), called as ``local(original, module, q, k, v, mask, ...)``.
  Under Ulysses it runs on the gathered sequence of the local heads; without SP on the module's own.

Modules of a model that has neither (a reference model, a teacher, an eval copy) go straight to the
original kernel. Keeping the original key instead of registering a new name keeps every HF branch that
tests ``_attn_implementation == "flash_attention_2"`` intact. Handlers are set on every module that has a
``config`` (that is what calls the interface), so no architecture's attention class name is needed.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Optional

import torch

from lightning_ulysses.compat.transformers import (
    attention_functions,
    attn_implementation,
    eager_attention_of,
    mask_functions,
)

_SP_ATTR = "_lightning_ulysses_attention"
_LOCAL_ATTR = "_lightning_ulysses_local_attention"
_DISPATCH_MARK = "_lightning_ulysses_dispatch"
_install_lock = threading.Lock()


def plain_causal(module: torch.nn.Module, kwargs: dict) -> bool:
    """Whether an HF attention call (its module and kwargs) asks for plain causal attention: causal, no
    dropout, no logit softcapping, no attention sinks. What the LSE block kernels compute exactly (the
    packed-row path of Ulysses, :class:`lightning_ulysses.memory.tiled_attention.TiledAttentionCore`)."""
    is_causal = kwargs.get("is_causal")
    return bool(
        (getattr(module, "is_causal", True) if is_causal is None else is_causal)
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
    )


def install_attention_dispatcher(impl: str) -> None:
    """Wrap the global HF attention function ``impl`` once per process (idempotent). ``"eager"`` has no global
    entry: the dispatcher registered under that name calls each layer's own eager function (its modeling file's)."""
    functions = attention_functions()
    with _install_lock:
        original = functions.get(impl)
        if getattr(original, _DISPATCH_MARK, False):
            return
        if original is None and impl != "eager":
            raise KeyError(f"transformers has no attention implementation {impl!r} registered.")

        def ulysses_dispatch(module, query, key, value, attention_mask, *args, **kwargs):
            local = getattr(module, _LOCAL_ATTR, None)
            kernel = original if original is not None else eager_attention_of(module)
            core = kernel if local is None else functools.partial(local, kernel)
            handler = getattr(module, _SP_ATTR, None)
            if handler is None:
                return core(module, query, key, value, attention_mask, *args, **kwargs)
            return handler(core, module, query, key, value, attention_mask, *args, **kwargs)

        setattr(ulysses_dispatch, _DISPATCH_MARK, True)
        ulysses_dispatch.__wrapped__ = original  # type: ignore[attr-defined]
        functions.set(impl, ulysses_dispatch)


_MASK_MARK = "_lightning_ulysses_mask_skip"
_own_masks = threading.local()  # depth of model forwards whose attention builds its own masks


def _install_mask_skip(impl: str) -> None:
    """Wrap transformers' mask builder for ``impl`` once per process: inside a forward of a model whose attention
    handler builds its own masks (:func:`own_masks`) it returns None instead of a dense mask.

    Under Ulysses the model sees only its shard, so transformers' mask (a ``[c, c]`` block-diagonal one for packed
    rows: ``c^2`` bytes, 4 GiB at 64K local tokens) is meaningless and would only cost memory; at SP=1 the packed-row
    path runs one kernel call per segment instead of a masked kernel."""
    functions = mask_functions()
    with _install_lock:
        original = functions.get(impl)
        if original is None or getattr(original, _MASK_MARK, False):
            return

        def mask_or_none(*args: Any, **kwargs: Any) -> Any:
            return None if getattr(_own_masks, "depth", 0) else original(*args, **kwargs)

        setattr(mask_or_none, _MASK_MARK, True)
        mask_or_none.__wrapped__ = original  # type: ignore[attr-defined]
        functions.set(impl, mask_or_none)


def _enter(module: torch.nn.Module, args: Any) -> None:
    _own_masks.depth = getattr(_own_masks, "depth", 0) + 1


def _exit(module: torch.nn.Module, args: Any, output: Any) -> None:
    _own_masks.depth -= 1


def own_masks(model: torch.nn.Module) -> list:
    """transformers builds no attention mask inside ``model``'s forwards (its SP handler builds what it needs);
    returns the hook handles that undo it. The decoder (``get_decoder()``, where transformers builds the mask) is
    hooked too: losses that take hidden states call it directly (preference, distillation, RL log-probs), and a dense
    ``[S, S]`` mask for their packed rows would be built (and held until backward by checkpointed layers, whose
    inputs it is) for nothing."""
    _install_mask_skip(attn_implementation(model))
    targets = [model]
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if isinstance(decoder, torch.nn.Module) and decoder is not model:
        targets.append(decoder)
    return [h for m in targets
            for h in (m.register_forward_pre_hook(_enter), m.register_forward_hook(_exit, always_call=True))]


def _set(model: torch.nn.Module, attr: str, value: Optional[Callable]) -> None:
    for m in model.modules():
        if getattr(m, "config", None) is not None:
            if value is not None:
                setattr(m, attr, value)
            elif hasattr(m, attr):
                delattr(m, attr)


def set_sp_attention(model: torch.nn.Module, handler: Optional[Callable]) -> None:
    """Route ``model``'s attention calls through a sequence-parallel ``handler`` (``None`` removes it)."""
    if handler is not None:
        install_attention_dispatcher(attn_implementation(model))
    _set(model, _SP_ATTR, handler)


def set_local_attention(model: torch.nn.Module, local: Optional[Callable]) -> None:
    """Route ``model``'s attention kernel calls through ``local(original, module, q, k, v, mask, **kw)``
    (``None`` removes it). Composes with :func:`set_sp_attention` in either order."""
    if local is not None:
        install_attention_dispatcher(attn_implementation(model))
    _set(model, _LOCAL_ATTR, local)


def sp_attention_of(model: torch.nn.Module) -> Any:
    return getattr(model, _SP_ATTR, None)


def local_attention_of(model: torch.nn.Module) -> Optional[Callable]:
    return getattr(model, _LOCAL_ATTR, None)


__all__ = [
    "install_attention_dispatcher",
    "own_masks",
    "local_attention_of",
    "plain_causal",
    "set_local_attention",
    "set_sp_attention",
    "sp_attention_of",
]
