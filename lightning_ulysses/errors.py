"""Errors that every rank detects alike are reported once.

A bad layout or a bad batch is usually seen by every rank at the same moment. Raising it everywhere prints
the same traceback ``world_size`` times (and under torchrun interleaves them); instead the lowest rank that
saw it raises, and the others leave with status 1 and one line that points to it. The job ends the same
way (non-zero exit on every rank), only the report is readable.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional, Sequence

import torch.distributed as dist


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)) or 0)


def raise_once(exc: BaseException, reporting_rank: int = 0, ranks_that_saw_it: Optional[Sequence[int]] = None) -> None:
    """Raise ``exc`` on ``reporting_rank``; every other rank that saw it exits quietly (status 1).

    ``ranks_that_saw_it`` (global ranks) defaults to all: a rank outside it is not stopped here.
    """
    rank = _rank()
    if rank == reporting_rank:
        raise exc
    if ranks_that_saw_it is None or rank in ranks_that_saw_it:
        print(
            f"lightning_ulysses: rank {rank} stops: rank {reporting_rank} reports the error "
            f"({type(exc).__name__}).",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1)


@contextmanager
def reported_once(*kinds: type[BaseException]) -> Iterator[None]:
    """Run a block that every rank runs alike on the same inputs (configuration checks, reading the same data files,
    refusing the same model): an error of ``kinds`` (default ``ValueError``, ``TypeError``, ``OSError``,
    ``ImportError``) is raised by rank 0 alone, the other ranks stop with one line (:func:`raise_once`)."""
    try:
        yield
    except (kinds or (ValueError, TypeError, OSError, ImportError)) as exc:
        raise_once(exc)


def errors_reported_once(fn: Callable) -> Callable:
    """Decorator: ``fn``'s errors go through :func:`reported_once` (for constructors and setup hooks that every rank
    runs with the same arguments)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with reported_once():
            return fn(*args, **kwargs)

    return wrapper


__all__ = ["errors_reported_once", "raise_once", "reported_once"]
