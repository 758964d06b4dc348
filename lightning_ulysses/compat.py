"""Private APIs of our dependencies, each wrapped once here with the versions it was checked against.

When a dependency changes one of these, the test of this module (``tests/test_compat.py``) fails and names
the call, instead of a training run going wrong somewhere else.
"""

from __future__ import annotations

from typing import Any


def lightning_step_boundary(trainer: Any) -> bool:
    """Whether the current training batch ends an accumulation window (the optimizer steps after it).

    Lightning's own decision (``fit_loop._should_accumulate``; lightning 2.5-2.6.6): every
    ``accumulate_grad_batches`` batches from the epoch start, and at the epoch's last batch when the strategy
    does not handle accumulation itself.
    """
    return not trainer.fit_loop._should_accumulate()


__all__ = ["lightning_step_boundary"]
