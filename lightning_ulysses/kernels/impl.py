"""Which implementation a fused op runs: Liger's Triton kernels or this package's torch code.

The tiled loss, the memory-efficient RMSNorm and the memory-efficient SwiGLU each take an ``impl``:
``"auto"`` uses Liger when liger-kernel is installed *and* the tensor is on CUDA (Liger's kernels are
Triton: importable anywhere, runnable only on a GPU), else torch; ``"liger"`` insists on Liger;
``"torch"`` never uses it. The choice is made per call from the tensor, so one model object works on
CPU in tests and on GPU in training.
"""

from __future__ import annotations

import functools

from torch import Tensor

IMPLS = ("auto", "torch", "liger")


def check_impl(impl: str, what: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{what} impl must be one of {list(IMPLS)}, got {impl!r}.")


@functools.lru_cache(maxsize=None)
def liger_installed() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def use_liger(impl: str, x: Tensor, what: str) -> bool:
    """True when ``impl`` selects Liger for an op on ``x``; an error naming the fix when it cannot."""
    check_impl(impl, what)
    if impl == "torch":
        return False
    available = x.is_cuda and liger_installed()
    if impl == "liger" and not available:
        raise RuntimeError(
            f"{what} impl='liger' needs liger-kernel installed and a CUDA device (the tensor is on {x.device}); "
            "pip install 'lightning-ulysses[liger]', or use impl='auto'/'torch'."
        )
    return available


__all__ = ["IMPLS", "check_impl", "liger_installed", "use_liger"]
