"""Private APIs of our dependencies, each wrapped once here with the versions it was checked against.

When a dependency changes one of these, the test of this module (``tests/test_compat.py``) fails and names
the call, instead of a training run going wrong somewhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def lightning_step_boundary(trainer: Any) -> bool:
    """Whether the current training batch ends an accumulation window (the optimizer steps after it).

    Lightning's own decision (``fit_loop._should_accumulate``; lightning 2.5-2.6.6): every
    ``accumulate_grad_batches`` batches from the epoch start, and at the epoch's last batch when the strategy
    does not handle accumulation itself.
    """
    return not trainer.fit_loop._should_accumulate()


class TransformersZero3:
    """Keeps transformers' DeepSpeed ZeRO-3 integration switched on (transformers 5.x, ``HfDeepSpeedConfig``).

    While it is on, ``from_pretrained`` / ``from_config`` build the model partitioned (``deepspeed.zero.Init``),
    load each checkpoint tensor into its shards and run the model's own weight init on gathered parameters;
    without it they see the empty tensors of an enclosing ``zero.Init`` and fail (size mismatch) or skip the init.
    transformers finds the config through a module-level weak reference, so this object holds the strong one.
    """

    def __init__(self) -> None:
        self._config: Any = None

    def enable(self, ds_config: dict) -> None:
        from transformers.integrations import HfDeepSpeedConfig

        self._config = HfDeepSpeedConfig(ds_config)

    def disable(self) -> None:
        if self._config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._config = None

    @property
    def enabled(self) -> bool:
        return self._config is not None


@contextmanager
def zero_init_paused() -> Iterator[None]:
    """Build modules as plain tensors inside an active ``deepspeed.zero.Init`` (deepspeed 0.19.x:
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


__all__ = ["TransformersZero3", "lightning_step_boundary", "zero_init_paused"]
