"""Resuming at another layout: DeepSpeed's universal checkpoint.

ZeRO-1/2/3 checkpoints hold one optimizer partition per rank; DeepSpeed loads them only at the world size and
stage they were saved at. Its universal format holds each parameter whole (fp32 weights, optimizer moments, step),
so any partition count can read it. A checkpoint whose layout differs from the run's is converted once,
by rank 0, into ``<path>/universal`` (written as ``universal.partial`` and renamed when complete, so a crash mid-way
is redone, never half-read), then every rank loads it. ZeRO-1 and ZeRO-2 read each other's files; ZeRO-3 and
ZeRO-0 keep their own stage.

Changing the SP degree at the same world size changes nothing in the files (parameters are whole on every SP rank):
such a resume loads the checkpoint as it is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from lightning_ulysses.checkpoint.files import PARTIAL_SUFFIX, TAG, CheckpointError, SavedLayout, read_layout
from lightning_ulysses.compat.deepspeed import convert_to_universal

UNIVERSAL_TAG = "universal"


def needs_resharding(saved: SavedLayout, current: SavedLayout) -> bool:
    """Whether DeepSpeed cannot load ``saved`` as it is at ``current`` (raises for what cannot work at all)."""
    if saved.zero_stage == 0 and current.zero_stage == 0:
        if saved.optimizer_partitions and saved.world_size != current.world_size:
            raise CheckpointError(
                f"The checkpoint was saved at {saved.describe()} with DeepSpeed's bf16 optimizer, which partitions the "
                f"optimizer state over the {saved.world_size} ranks; this run has {current.world_size}. Resume at the "
                "saved world size (any SP degree), or train at ZeRO-1/2, whose checkpoints reshard."
            )
        return False  # nothing partitioned: the full optimizer state is in the model-state file
    if (saved.zero_stage == 0) != (current.zero_stage == 0):
        raise CheckpointError(
            f"The checkpoint was saved at {saved.describe()}; this run uses ZeRO stage {current.zero_stage}. Moving "
            "between ZeRO-0 and ZeRO-1/2/3 is not supported: resume at the saved stage, or export the weights "
            "(`lightning-ulysses export CHECKPOINT DIR`) and start a new run from them (the optimizer state is lost)."
        )
    if (saved.zero_stage == 3) != (current.zero_stage == 3):
        raise CheckpointError(
            f"The checkpoint was saved at {saved.describe()}; this run uses ZeRO stage {current.zero_stage}. Moving "
            "between ZeRO-3 and ZeRO-1/2 on resume is not supported (DeepSpeed lays out their model-state files "
            "differently): resume at the saved stage (any world size and SP degree), or export the weights "
            "(`lightning-ulysses export CHECKPOINT DIR`) and start a new run from them (the optimizer state is lost)."
        )
    reshard = saved.world_size != current.world_size
    if reshard and saved.optimizer_state is not None and not set(UNIVERSAL_STATE) <= set(saved.optimizer_state):
        raise CheckpointError(unconvertible_optimizer(saved.optimizer or "the optimizer", saved.optimizer_state, saved,
                                                      current.world_size))
    return reshard


# the per-parameter optimizer state DeepSpeed's universal converter and loader carry: Adam's two moments, by name
UNIVERSAL_STATE = ("exp_avg", "exp_avg_sq")


def unconvertible_optimizer(name: str, state: Optional[list[str]], saved: SavedLayout, world_size: Optional[int]) -> str:
    held = f", which keeps {sorted(state)}" if state else ", which keeps no per-parameter state" if state is not None else ""
    here = f"; this run has world size {world_size}" if world_size is not None else ""
    return (
        f"The checkpoint was saved at {saved.describe()} with {name}{held}{here}. Resuming at another world size goes "
        f"through DeepSpeed's universal checkpoint, whose converter carries only Adam's moments ({', '.join(UNIVERSAL_STATE)}). Resume at world size "
        f"{saved.world_size} (any SP degree), or export the weights (`lightning-ulysses export CHECKPOINT DIR`) and "
        "start a new run from them (the optimizer's own state is lost)."
    )


def universal_tag(path: str, workers: int = 1) -> str:
    """Convert ``path`` (once) and return the tag to load: ``engine.load_checkpoint(path, tag=...)``. Rank 0 only."""
    out = Path(path) / UNIVERSAL_TAG
    if not (out / "zero").is_dir():
        staging = str(out) + PARTIAL_SUFFIX
        if os.path.isdir(staging):
            shutil.rmtree(staging)
        try:
            convert_to_universal(str(Path(path) / TAG), staging, workers=workers)
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, KeyError) and exc.args and exc.args[0] in UNIVERSAL_STATE:  # a checkpoint without the record
                saved = read_layout(path)
                raise CheckpointError(unconvertible_optimizer("an optimizer without Adam's moments", None, saved,
                                                              None)) from exc
            raise CheckpointError(
                f"Could not convert {path} to DeepSpeed's universal format to load it at another layout ({exc}). "
                "The conversion writes about twice the optimizer state next to the checkpoint: check free disk "
                "space. A checkpoint written before resharding was supported records the SP degree as tensor "
                "parallelism (`checkpoint_parallel_dimensions` in its model-state file) and cannot be converted. "
                "Either way, resuming at the world size it was saved at needs no conversion."
            ) from exc
        os.replace(staging, out)
    return UNIVERSAL_TAG


__all__ = ["UNIVERSAL_STATE", "UNIVERSAL_TAG", "needs_resharding", "universal_tag"]
