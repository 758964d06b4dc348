"""CUDA caching-allocator defaults for long sequences.

``expandable_segments:True`` lets the allocator grow segments instead of stranding memory in
fixed-size blocks; at 100K+ tokens the activation sizes vary per layer and fragmentation otherwise
costs several GiB. It only takes effect if set before CUDA's allocator initialises, so the package
sets it on import and the strategy again at construction, unless the user set it already.
"""

from __future__ import annotations

import os

import torch

_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def set_expandable_segments() -> bool:
    """Set ``expandable_segments:True`` unless an allocator config exists; True if it was set here."""
    if any(v in os.environ for v in _VARS):
        return False
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return False  # too late to take effect; the user keeps the default
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return True
