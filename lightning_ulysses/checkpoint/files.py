"""A DeepSpeed checkpoint directory as Lightning writes it (``<path>/checkpoint/*.pt`` + ``<path>/latest``).

Saving goes to ``<path>.partial`` and is renamed to ``<path>`` only after every rank finished and rank 0 wrote the
manifest (``ulysses_checkpoint.json``: every file with its size). A crash mid-save thus leaves a ``.partial``
directory, never one that looks complete; a file truncated later (a full disk, a copy cut short) no longer matches
its manifest size and loading names it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional

MANIFEST = "ulysses_checkpoint.json"
PARTIAL_SUFFIX = ".partial"
TAG = "checkpoint"  # the tag Lightning's DeepSpeedStrategy saves under

_OPTIM = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_ZERO3_MODEL = re.compile(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message names the way out."""


@dataclass(frozen=True)
class SavedLayout:
    """What decides whether DeepSpeed can load a checkpoint as it is: how many ranks share the ZeRO state (the
    world size: ZeRO partitions over all ranks, SP ranks included) and the ZeRO stage (0: nothing partitioned;
    1 and 2 read alike). The SP degree is recorded for information: parameters are whole on every SP rank."""

    world_size: int
    zero_stage: int
    sequence_parallel_size: Optional[int] = None
    optimizer_partitions: int = 0  # per-rank optimizer files (ZeRO-1/2/3, and DeepSpeed's bf16 optimizer at ZeRO-0)
    optimizer: Optional[str] = None  # the torch optimizer's class name (None: not recorded)
    optimizer_state: Optional[list[str]] = None  # the per-parameter state it keeps (["exp_avg", "exp_avg_sq"], [], ...)

    def describe(self) -> str:
        sp = f", sp={self.sequence_parallel_size}" if self.sequence_parallel_size else ""
        return f"world size {self.world_size}, ZeRO stage {self.zero_stage}{sp}"


def optimizer_record(optimizer: Any) -> tuple[Optional[str], Optional[list[str]]]:
    """``(class name, per-parameter state keys)`` of the torch optimizer inside DeepSpeed's wrapper (for the manifest:
    resharding can carry only some optimizers' state). Before the first step the state is empty: an optimizer with
    ``betas`` (Adam-like) is then recorded as unknown (``None``), any other as keeping none (``[]``)."""
    if optimizer is None:
        return None, None
    while hasattr(optimizer, "optimizer"):  # DeepSpeed's ZeRO / bf16 optimizers wrap the torch one
        optimizer = optimizer.optimizer
    keys = sorted({str(k) for state in optimizer.state.values() for k, v in state.items() if k != "step" and v is not None})
    if not keys and any("betas" in group for group in optimizer.param_groups):
        return type(optimizer).__name__, None
    return type(optimizer).__name__, keys


def staging_path(path: str) -> str:
    return str(path).rstrip("/") + PARTIAL_SUFFIX


def read_layout(path: str) -> SavedLayout:
    """The layout a checkpoint was saved at, from its manifest or else from DeepSpeed's file names (one optimizer
    file per ZeRO partition; per-rank model files only under ZeRO-3)."""
    manifest = read_manifest(path)
    if manifest is not None and "layout" in manifest:
        return SavedLayout(**manifest["layout"])
    tag_dir = Path(path) / TAG
    names = [p.name for p in tag_dir.iterdir()] if tag_dir.is_dir() else []
    partitions = _partitions(names)
    if not partitions:
        return SavedLayout(world_size=1, zero_stage=0)  # the optimizer state lives in the model-state file
    stage = 3 if any(_ZERO3_MODEL.search(n) for n in names) else 2
    return SavedLayout(world_size=partitions, zero_stage=stage, optimizer_partitions=partitions)


def read_manifest(path: str) -> Optional[dict]:
    file = Path(path) / MANIFEST
    return json.loads(file.read_text()) if file.is_file() else None


def write_manifest(path: str, layout: SavedLayout) -> None:
    """Record every file under ``path`` with its size (call after all ranks finished writing)."""
    root = Path(path)
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    layout = replace(layout, optimizer_partitions=_partitions(files))
    (root / MANIFEST).write_text(json.dumps({"layout": asdict(layout), "files": files}, indent=1))


def _partitions(names: Iterable[str]) -> int:
    return len({m.group(1) for n in names if (m := _OPTIM.search(Path(n).name))})


def publish(staging: str, path: str) -> None:
    """Move a complete ``staging`` directory to ``path``, replacing what was there (``last.ckpt`` is rewritten)."""
    old = None
    if os.path.lexists(path):
        old = str(path).rstrip("/") + ".old"
        _remove(old)
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        _remove(old)


def remove_stale_staging(path: str) -> None:
    """Drop the staging directory a crashed save left behind (before saving to ``path`` again)."""
    _remove(staging_path(path))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def verify_checkpoint(path: str) -> None:
    """Raise :class:`CheckpointError` for a checkpoint that is missing, unfinished or truncated."""
    p = Path(path)
    if not p.exists():
        partial = Path(staging_path(path))
        hint = (f" A save to it did not finish ({partial.name} is there); resume from an earlier checkpoint."
                if partial.exists() else "")
        raise CheckpointError(f"No checkpoint at {path}.{hint}")
    if str(path).rstrip("/").endswith(PARTIAL_SUFFIX):
        raise CheckpointError(f"{path} is a save that did not finish (it would be renamed without '{PARTIAL_SUFFIX}' "
                              "when complete); resume from an earlier checkpoint.")
    manifest = read_manifest(path)
    if manifest is None:
        return  # written by a plain DeepSpeedStrategy or an older release: DeepSpeed's own checks apply
    problems = []
    for name, size in manifest["files"].items():
        f = p / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, {size} were written")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"The checkpoint {path} is damaged ({shown}). Resume from an earlier checkpoint "
                              "(ModelCheckpoint keeps `save_top_k` of them) or restore the files from a copy.")


__all__ = ["CheckpointError", "MANIFEST", "SavedLayout", "optimizer_record", "publish", "read_layout", "read_manifest",
           "remove_stale_staging", "staging_path", "verify_checkpoint", "write_manifest"]
