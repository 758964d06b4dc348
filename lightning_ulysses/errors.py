"""Errors that every rank detects alike are reported once.

A bad layout or a bad batch is usually seen by every rank at the same moment. Raising it everywhere prints
the same traceback ``world_size`` times (and under torchrun interleaves them); instead the lowest rank that
saw it raises, and the others leave with status 1 and one line that points to it. The job ends the same
way (non-zero exit on every rank), only the report is readable.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

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


__all__ = ["raise_once"]
