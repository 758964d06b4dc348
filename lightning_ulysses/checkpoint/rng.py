"""Each rank's random number generator states, saved next to its ZeRO shards (``rng_state_<rank>.pt``) and restored
on resume at the same world size, so dropout draws the masks an uninterrupted run would have drawn. (Lightning's
checkpoint carries no RNG state; data order does not depend on it: samplers seed from the epoch.)"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch


def _file(path: str, rank: int) -> Path:
    return Path(path) / f"rng_state_{rank}.pt"


def save_rng_state(path: str, rank: int) -> None:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    torch.save(state, _file(path, rank))


def load_rng_state(path: str, rank: int) -> bool:
    """Restore this rank's states if the checkpoint has them; returns whether it did."""
    file = _file(path, rank)
    if not file.is_file():
        return False
    state = torch.load(file, weights_only=False)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    return True


__all__ = ["load_rng_state", "save_rng_state"]
