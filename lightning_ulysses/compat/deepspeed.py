"""DeepSpeed's private APIs (checked against deepspeed 0.19.x)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from typing import Any

from torch import Tensor

CHECKED = "deepspeed>=0.19,<0.20"


def is_zero3_params(params: Iterable[Tensor]) -> bool:
    """Whether these parameters are ZeRO-3 partitioned (DeepSpeed tags them with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in params)


def set_zero3_grads_ready(params: Iterable[Tensor], ready: bool) -> None:
    """ZeRO-3 reduces a parameter's gradient in the backward hook only when ``ds_grad_is_ready`` is True: a module
    run several times in one backward (tiles) marks all but its last run not ready."""
    for p in params:
        p.ds_grad_is_ready = ready


def use_mpu(mpu: Any) -> None:
    """Make ``mpu`` (or ``None``: plain world groups) the one DeepSpeed's reductions read.

    DeepSpeed keeps the ``mpu`` of the last engine built *with* one in a module global (``deepspeed.utils.groups.mpu``)
    and reads the DP / sequence-DP groups from it on every reduction; an engine built later *without* one does not
    reset it. A second fit in the same process at sp=1 after one at sp>1 would then reduce its gradients over the
    previous layout's groups (found by running parity cases one after another in one process)."""
    from deepspeed.utils import groups

    groups.mpu = mpu


@contextmanager
def zero_init_paused() -> Iterator[None]:
    """Build modules as plain tensors inside an active ``deepspeed.zero.Init`` (
    ``shutdown_init_context`` / ``restore_init_context``, which the engine itself uses).

    For small modules added to a partitioned model (LoRA adapters): their constructors' in-place inits
    (``zeros_``, ``kaiming_uniform_``) would run on empty partitions and be lost. The engine partitions
    such parameters when it is built.
    """
    import sys

    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    active = zero is not None and zero.top_level_context is not None
    if active:
        zero.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            zero.restore_init_context()


__all__ = ["CHECKED", "is_zero3_params", "set_zero3_grads_ready", "use_mpu", "zero_init_paused"]
