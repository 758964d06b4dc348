"""A training loader that resumes mid-epoch where an uninterrupted run would be.

Lightning saves ``state_dict()`` of every training loader that has one and hands it back through
``load_state_dict()`` before the first ``iter()`` of a resumed fit. The state here is the *global* sample position
in the epoch: batches done (Lightning's own progress counter, read at save time: the loader itself is a batch ahead
because Lightning prefetches) x batch size x data-parallel replicas. A resume at another DP degree or batch size
then skips the same samples, provided the new global batch divides the position.

Skipping is by index (the batch sampler's first batches are dropped, no sample is read) for map-style datasets,
and by reading and dropping batches for iterable ones. The sampler's epoch (shuffle order) is Lightning's: it
restores the epoch and calls ``set_epoch`` as in an uninterrupted run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional

from torch.utils.data import DataLoader, IterableDataset

from lightning_ulysses.checkpoint.files import CheckpointError


class _SkipBatches:
    """A batch sampler without its first ``skip`` batches (indices only; nothing is loaded)."""

    def __init__(self, batch_sampler: Iterable, skip: int) -> None:
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)  # type: ignore[arg-type]


def _skipped(loader: Any, skip: int) -> Iterator[Any]:
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        # the same loader over a batch sampler that starts `skip` batches later (DataLoader forbids swapping it)
        workers = loader.num_workers
        clone = DataLoader(
            loader.dataset, batch_sampler=_SkipBatches(loader.batch_sampler, skip), num_workers=workers,
            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator, prefetch_factor=loader.prefetch_factor if workers else None,
            persistent_workers=loader.persistent_workers if workers else False,
            pin_memory_device=loader.pin_memory_device,
        )
        return iter(clone)
    it = iter(loader)
    for _ in itertools.islice(it, skip):
        pass
    return it


class ResumableLoader:
    """Wraps a training loader (``len``, ``sampler``, attribute writes: the wrapped loader's) and makes its position
    part of Lightning's checkpoint.

    Args:
        loader: the training loader (after Lightning added its distributed sampler).
        position: ``() -> (epoch, batches done in it)``, read when Lightning saves.
        replicas: data-parallel replicas reading different samples (the DP degree; SP ranks read the same).
        on_resume: called once, right after the first iterator of a resumed run is made (restore RNG states here:
            making a DataLoader iterator draws its worker base seed from the global generator, a draw the
            uninterrupted run made at its epoch start).
    """

    def __init__(
        self,
        loader: Any,
        position: Callable[[], tuple[int, int]],
        replicas: int,
        on_resume: Optional[Callable[[], None]] = None,
    ) -> None:
        object.__setattr__(self, "_loader", loader)
        object.__setattr__(self, "_position", position)
        object.__setattr__(self, "_replicas", int(replicas))
        object.__setattr__(self, "_resume", None)
        object.__setattr__(self, "_on_resume", on_resume)

    def _global_batch(self) -> Optional[int]:
        size = getattr(self._loader, "batch_size", None)
        return size * self._replicas if size else None

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self._position()
        return {"epoch": int(epoch), "batches": int(batches), "global_batch": self._global_batch(),
                "replicas": self._replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "_resume", dict(state))

    def _batches_to_skip(self) -> int:
        state = self._resume
        object.__setattr__(self, "_resume", None)  # only the first epoch after a resume starts late
        if state is None or state["epoch"] != self._position()[0] or state["batches"] == 0:
            return 0
        saved, now = state.get("global_batch"), self._global_batch()
        if saved == now and state.get("replicas") == self._replicas:
            return state["batches"]
        samples = state["batches"] * saved if saved else None
        if samples is None or now is None or samples % now:
            raise CheckpointError(
                f"The checkpoint stopped {state['batches']} batches into epoch {state['epoch']} with a global batch of "
                f"{saved} samples ({state.get('replicas')} data-parallel replicas); this run's global batch is {now} "
                f"({self._replicas} replicas), which does not divide the {samples} samples read. Resume with a "
                "batch size x DP degree that divides it, or from a checkpoint saved at the end of an epoch."
            )
        return samples // now

    def __iter__(self) -> Iterator[Any]:
        resumed = self._resume is not None
        skip = self._batches_to_skip()
        it = _skipped(self._loader, skip) if skip else iter(self._loader)
        if resumed and self._on_resume is not None:
            self._on_resume()
        return it

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._loader, name, value)


__all__ = ["ResumableLoader"]
