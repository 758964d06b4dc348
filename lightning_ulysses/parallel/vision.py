"""The vision tower's share of a batch on each SP rank, and the gradient-correct gather of its features.

A batch's images and videos are cut into *units* the tower encodes independently: an image, or one temporal frame
group of a video (Qwen-VL towers attend within a frame group: ``cu_seqlens`` repeat ``h * w`` per ``t``). Units are
dealt to the SP ranks in order, contiguous, balanced by patch count (:func:`split_units`); each rank encodes its own,
and :func:`gather_features` concatenates every rank's features in unit order on every rank. So the tower's compute
and activation memory divide by ``sp``, and the features come out in the order the model's placeholders expect. A
rank encodes its share in tiles of whole units (:func:`tiles_of`): each tower block runs, and under checkpointing is
recomputed, one tile at a time, so its working set is a tile's however long the video.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Unit:
    """One independently encoded piece: ``rows`` pixel rows from ``start`` of its source (``"image"`` or
    ``"video"``), encoded with grid ``(1, h, w)``, giving ``tokens`` features; ``patches`` is the sequence the tower
    attends over (the FLOP count's length; ``rows`` unless the source stores whole images)."""

    source: str
    start: int
    rows: int
    grid: tuple[int, int, int]
    tokens: int
    patches: int = 0

    def __post_init__(self) -> None:
        if not self.patches:
            object.__setattr__(self, "patches", self.rows)


def units_of(grid_thw: Optional[Tensor], source: str, merge: int) -> list[Unit]:
    """The units of one source's ``grid_thw [n, 3]``: every temporal group of every item, in order."""
    units: list[Unit] = []
    start = 0
    for t, h, w in (grid_thw.tolist() if grid_thw is not None else []):
        for _ in range(t):
            units.append(Unit(source, start, h * w, (1, h, w), h * w // (merge * merge)))
            start += h * w
    return units


def split_units(units: list[Unit], sp: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of the units each of ``sp`` ranks encodes: contiguous, the cut before ``r / sp`` of the total
    patch count falls after every unit whose middle lies before it (a rank may get none when units are few)."""
    total = sum(u.rows for u in units)
    cuts, done, i = [0], 0, 0
    for r in range(1, sp):
        while i < len(units) and done + units[i].rows / 2 <= total * r / sp:
            done += units[i].rows
            i += 1
        cuts.append(i)
    cuts.append(len(units))
    return [(cuts[r], cuts[r + 1]) for r in range(sp)]


def tiles_of(units: list[Unit], most_patches: int) -> list[list[Unit]]:
    """``units`` in consecutive groups of at most ``most_patches`` patches each (whole units; a larger unit alone).
    The tower encodes one group per call: its activation working set is one tile's, not the rank's share."""
    tiles: list[list[Unit]] = []
    size = 0
    for unit in units:
        if not tiles or size + unit.patches > most_patches:
            tiles.append([])
            size = 0
        tiles[-1].append(unit)
        size += unit.patches
    return tiles


class _GatherFeatures(torch.autograd.Function):
    """``[n_r, H]`` per rank -> ``[sum n, H]`` on every rank (rank order). Backward: every rank's loss used some of
    every rank's features, so the gradient is summed over the group (all-reduce) and each rank keeps its own rows."""

    @staticmethod
    def forward(ctx, local: Tensor, counts: list[int], rank: int, group: dist.ProcessGroup) -> Tensor:
        ctx.counts, ctx.rank, ctx.group = counts, rank, group
        most = max(counts)
        padded = local.new_zeros(most, local.shape[1])
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]  # sp x [most, H]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])  # [sum n, H]

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # [sum n, H]: every rank's contribution to every feature
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None, None


def gather_features(local: Tensor, counts: list[int], rank: int, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Every rank's ``local [counts[rank], H]`` features, concatenated in rank order (``[sum(counts), H]``); the
    identity without a group. Collective: every rank of ``group`` must call it, with the same ``counts``."""
    if group is None or len(counts) == 1:
        return local
    return _GatherFeatures.apply(local, counts, rank, group)


__all__ = ["Unit", "gather_features", "split_units", "tiles_of", "units_of"]
