"""Packing tokenized samples into rows of ``seq_len`` tokens, with no attention or prediction across samples.

A packed row holds several samples back to back. Each sample's ``position_ids`` restart at 0 -- the strategy's
attention derives sample boundaries from those restarts (per-segment kernels under Ulysses and at SP=1; flash
kernels' varlen path) -- and the first label of every sample is ``-100``, so after the one-token shift no token
predicts the first token of the next sample. The row's tail is padding (pad token, label ``-100``, positions
continuing the last sample, which no real token attends to).

Algorithms (``packing=``):

* ``"best_fit"``: best-fit decreasing per buffer of ``buffer`` samples: sort the buffer by length, longest
  first, and put each sample into the open row with the least room that still fits it (a new row if none); rows
  stay open across buffers. Deterministic, close to optimal for bin packing (about 99% real tokens on the shipped
  data), and the rows keep roughly the order of the data.
* ``"concat"``: samples in order, a row filled to exactly ``seq_len``; a sample that does not fit continues in the
  next row as a new segment (its second part starts at position 0: it cannot see its first part). No padding, but
  samples are cut.
* ``"none"``: one sample per row, padded per batch by the collate function.

Samples longer than ``seq_len`` are never cut silently: ``too_long="split"`` (pieces of ``seq_len``, each its own
sample), ``"drop"`` or ``"error"``; the counts are reported in :class:`PackingStats`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Optional

IGNORE_INDEX = -100
PACKINGS = ("best_fit", "concat", "none")
TOO_LONG = ("split", "drop", "error")


@dataclass
class PackingStats:
    samples: int = 0
    rows: int = 0
    real_tokens: int = 0
    row_tokens: int = 0
    split: int = 0  # samples longer than seq_len cut into pieces
    dropped: int = 0  # samples longer than seq_len left out
    lengths: list[int] = field(default_factory=list, repr=False)

    @property
    def efficiency(self) -> float:
        """Share of row tokens that are real (not padding)."""
        return self.real_tokens / self.row_tokens if self.row_tokens else 0.0

    def describe(self) -> str:
        return (f"{self.samples} samples -> {self.rows} rows, {100 * self.efficiency:.1f}% real tokens "
                f"({100 * (1 - self.efficiency):.1f}% padding); longer than seq_len: {self.split} split, {self.dropped} dropped")


def fit_lengths(samples: list[tuple[list[int], list[int]]], seq_len: int, too_long: str, stats: PackingStats):
    """Apply ``too_long`` to samples longer than ``seq_len`` (pieces keep their labels)."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {list(TOO_LONG)}, got {too_long!r}.")
    out = []
    for ids, labels in samples:
        if len(ids) <= seq_len:
            out.append((ids, labels))
        elif too_long == "split":
            stats.split += 1
            out += [(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
        elif too_long == "drop":
            stats.dropped += 1
        else:
            raise ValueError(
                f"A sample has {len(ids)} tokens, more than seq_len={seq_len}. Raise seq_len, or set too_long='split' "
                "(cut into seq_len pieces) or too_long='drop'."
            )
    return out


class BestFit:
    """Best-fit packing into rows of ``capacity`` tokens that stay open across buffers: each buffer is sorted
    longest first and every sample goes to the open row with the least room that still fits it (a new row if
    none). Rows from earlier buffers keep taking samples, so a buffer holding less than a row (many short samples,
    long rows) still fills rows."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: list[list[int]] = []
        self._room: list[tuple[int, int]] = []  # sorted (room left, row index)

    def add(self, lengths: dict[int, int]) -> None:
        """Place samples ``{index: length}`` (one buffer)."""
        for i in sorted(lengths, key=lambda i: (-lengths[i], i)):
            n = lengths[i]
            k = bisect.bisect_left(self._room, (n, -1))
            if k < len(self._room):
                left, r = self._room.pop(k)
                self.rows[r].append(i)
                bisect.insort(self._room, (left - n, r))
            else:
                self.rows.append([i])
                bisect.insort(self._room, (self.capacity - n, len(self.rows) - 1))


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` (best fit, longest first)."""
    packer = BestFit(capacity)
    packer.add(dict(enumerate(lengths)))
    return packer.rows


def _row(parts: list[tuple[list[int], list[int]]], seq_len: Optional[int], pad_id: int) -> dict:
    ids, labels, pos = [], [], []
    for p_ids, p_labels in parts:
        ids += p_ids
        labels += [IGNORE_INDEX] + list(p_labels[1:])  # nothing predicts a sample's first token
        pos += list(range(len(p_ids)))
    if seq_len is not None and len(ids) < seq_len:
        pad = seq_len - len(ids)
        start = pos[-1] + 1 if pos else 0
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        pos += list(range(start, start + pad))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def pack(
    samples: Iterable[tuple[list[int], list[int]]],
    seq_len: int,
    pad_id: int,
    packing: str = "best_fit",
    too_long: str = "split",
    buffer: int = 1000,
) -> tuple[list[dict], PackingStats]:
    """``(input_ids, labels)`` samples -> rows (``input_ids``, ``labels``, ``position_ids``) and their stats."""
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {list(PACKINGS)}, got {packing!r}.")
    if buffer < 1:
        raise ValueError(f"pack buffer must be >= 1 samples, got {buffer}.")
    stats = PackingStats()
    items = list(samples)
    stats.samples = len(items)
    if packing == "concat":
        rows = _concat(items, seq_len, pad_id)
    else:
        items = fit_lengths(items, seq_len, too_long, stats)
        if packing == "none":
            rows = [_row([s], None, pad_id) for s in items]
        else:
            packer = BestFit(seq_len)
            for start in range(0, len(items), buffer):
                packer.add({i: len(items[i][0]) for i in range(start, min(start + buffer, len(items)))})
            rows = [_row([items[i] for i in sorted(group)], seq_len, pad_id) for group in packer.rows]
    stats.rows = len(rows)
    stats.real_tokens = sum(len(s[0]) for s in items)
    # unpacked rows are padded per batch by the collate function, not here
    stats.row_tokens = sum(len(r["input_ids"]) for r in rows) if packing != "none" else stats.real_tokens
    return rows, stats


def _concat(items: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> list[dict]:
    rows, parts, used = [], [], 0
    for ids, labels in items:
        while ids:
            take = min(len(ids), seq_len - used)
            parts.append((ids[:take], labels[:take]))
            ids, labels, used = ids[take:], labels[take:], used + take
            if used == seq_len:
                rows.append(_row(parts, seq_len, pad_id))
                parts, used = [], 0
    if parts:
        rows.append(_row(parts, seq_len, pad_id))
    return rows


__all__ = ["PACKINGS", "TOO_LONG", "BestFit", "PackingStats", "best_fit_decreasing", "fit_lengths", "pack"]
