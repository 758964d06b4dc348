"""A model's full weights on rank 0, one parameter at a time (ZeRO-3 partitions gathered and released in turn), so
no rank ever holds a second full copy on the accelerator and only rank 0 holds one in host memory."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from lightning_ulysses.compat.deepspeed import is_zero3_params


def gather_weights(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> Optional[dict[str, torch.Tensor]]:
    """``model.state_dict()`` as host tensors on global rank 0 (``None`` on the others; every rank must call it).

    Under ZeRO-3 each parameter is all-gathered (``GatheredParameters``), copied to host memory on rank 0 and
    re-partitioned before the next one; otherwise every rank already holds the whole model. Tied parameters
    appear under every name ``state_dict`` gives them."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    params = dict(model.named_parameters(remove_duplicate=False))
    zero3 = is_zero3_params(params.values())
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if zero3 and name in params and hasattr(params[name], "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([params[name]]):
                if rank0:
                    out[name] = _host(params[name], dtype)
        elif rank0:
            out[name] = _host(tensor, dtype)
    return out if rank0 else None


def _host(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype=dtype or tensor.dtype, copy=True)


__all__ = ["gather_weights"]
