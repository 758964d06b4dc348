"""Checkpoints that survive what long runs meet: a crash mid-save, a resume mid-epoch, a resume at another layout.

* :mod:`.files` -- a DeepSpeed checkpoint directory: the layout it was saved at (read from its files), its manifest
  (every file with its size, written last), saving into a staging directory renamed into place when complete, and
  the checks that turn a truncated or unfinished checkpoint into a clear error.
* :mod:`.resharding` -- resuming at another world size or ZeRO stage: DeepSpeed's universal checkpoint, converted
  once and kept next to the original.
* :mod:`.resumable` -- a training loader whose position (global samples read in this epoch) is part of Lightning's
  checkpoint, so a resumed run reads the batch an uninterrupted run would read next.
* :mod:`.rng` -- each rank's random generator states, saved with its shards (dropout continues its stream).
* :mod:`.weights` -- a model's full weights on rank 0, gathered one parameter at a time (``HFExport``).
* :mod:`.hf_model` -- those weights written as a Hugging Face model directory (``export``, ``HFExport``).

No module here imports Lightning; the strategy wires them into ``save_checkpoint`` / ``load_checkpoint`` /
``process_dataloader``.
"""

from lightning_ulysses.checkpoint.files import CheckpointError, SavedLayout, read_layout, verify_checkpoint
from lightning_ulysses.checkpoint.resharding import needs_resharding
from lightning_ulysses.checkpoint.resumable import ResumableLoader

__all__ = ["CheckpointError", "ResumableLoader", "SavedLayout", "needs_resharding", "read_layout", "verify_checkpoint"]
