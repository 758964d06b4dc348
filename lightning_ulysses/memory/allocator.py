"""CUDA caching-allocator defaults for long sequences.

``expandable_segments:True`` lets the allocator grow segments instead of stranding memory in
fixed-size blocks; at 100K+ tokens the activation sizes vary per layer and fragmentation otherwise
costs several GiB. It only takes effect if set before CUDA's allocator initialises: the strategy sets it at
construction (``expandable_segments=True``, the default), before any model or batch reaches the GPU, unless the
user set an allocator config already. A project without the strategy calls :func:`set_expandable_segments` first.
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
