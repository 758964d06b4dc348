"""torch's private APIs (checked against torch 2.11-2.13).

The attention block kernels of :mod:`lightning_ulysses.kernels.attention` call torch's private SDPA ops
(``aten._scaled_dot_product_*``) directly, since binding them is that module's purpose; ``SDPA_OPS`` names them
for the compat test.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

CHECKED = "torch>=2.11,<=2.13"
SDPA_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_cudnn_attention_backward",
)


def all_to_all_autograd(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Differentiable all-to-all over dim 0 (even splits), waited on: torch's functional collective, whose
    backward is the same exchange and which traces under torch.compile (the ``torch.distributed.nn`` one is
    deprecated)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x, None, None, group))


def no_dispatch_modes() -> AbstractContextManager[Any]:
    """Run code outside every active dispatch mode (e.g. selective checkpointing's recording mode)."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


__all__ = ["CHECKED", "SDPA_OPS", "all_to_all_autograd", "no_dispatch_modes"]
