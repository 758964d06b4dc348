"""Gradient accumulation: the token count of a whole optimizer step, known before its first micro-batch.

``loss_normalization="global_tokens"`` divides every micro-batch's summed cross-entropy by ``N``, the valid
tokens of *all* micro-batches of the optimizer step on all DP ranks. ``N`` must be known when the first
micro-batch's backward runs, so the training dataloader is read one accumulation window ahead (as HF's
Trainer does for ``num_items_in_batch``): :class:`WindowTokenCounter` yields the same batches in the same
order and, for each, records the valid-label count of its window in a queue the strategy reads when the
batch reaches ``batch_to_device``. Counts are taken from the batches as the dataloader yields them (after
``collate_fn``, before ``on_before_batch_transfer``), with the rule of :func:`lightning_ulysses.parallel.sharding.prepare_batch`.

Windows follow Lightning's: ``accumulate_grad_batches`` batches from the start of each epoch, the last one
cut at the epoch's last training batch (``limit_train_batches`` included).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Callable

from lightning_ulysses.parallel.sharding import IGNORE_INDEX, prepare_batch


def count_label_tokens(batch: Any) -> int:
    """Valid (non -100) shifted labels of a full batch, as :func:`prepare_batch` will produce them."""
    import torch

    if torch.is_tensor(batch):
        batch = {"input_ids": batch}
    return int((prepare_batch(batch, pad_to_multiple_of=1)["shift_labels"] != IGNORE_INDEX).sum())


class WindowTokenCounter:
    """Wraps a training dataloader; each yielded batch queues the token count of its accumulation window.

    Everything else (``len``, ``sampler``, ``batch_size``, attribute writes such as ``worker_init_fn``) is
    the wrapped loader's, so Lightning's sampler epochs and worker seeding reach it unchanged.
    """

    def __init__(self, loader: Iterable, window: int, queue: deque, num_batches: Callable[[], float]) -> None:
        object.__setattr__(self, "_loader", loader)
        object.__setattr__(self, "_window", max(1, int(window)))
        object.__setattr__(self, "_queue", queue)
        object.__setattr__(self, "_num_batches", num_batches)

    def __iter__(self) -> Iterator[Any]:
        self._queue.clear()
        stop = self._num_batches()
        it = iter(self._loader)
        index = 0
        while True:
            # window = batches up to the next multiple of `window`, or the epoch's last training batch
            size = self._window
            if stop != float("inf"):
                size = max(1, min(size, int(stop) - index))
            window = list(itertools.islice(it, size))
            if not window:
                return
            total = sum(count_label_tokens(b) for b in window)
            for batch in window:
                self._queue.append(total)
                index += 1
                yield batch

    def __len__(self) -> int:
        return len(self._loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._loader, name, value)


__all__ = ["WindowTokenCounter", "count_label_tokens"]
