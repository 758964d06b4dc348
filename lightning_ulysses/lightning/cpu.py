"""Running DeepSpeed on CPU (gloo): debugging on a laptop, and every multi-process test in CI.

Lightning's ``DeepSpeedStrategy`` refuses non-CUDA accelerators, and its DeepSpeed setup reads
``root_device.index``, which is ``None`` for plain ``torch.device("cpu")``. DeepSpeed itself runs fine
on CPU with its CPU accelerator and gloo, so the strategy (a) skips the CUDA-only check, (b) gives
every process an indexed CPU device ``cpu:<local_rank>`` and (c) selects DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import torch


def is_cpu(accelerator: Any) -> bool:
    from lightning.pytorch.accelerators import CPUAccelerator

    return isinstance(accelerator, CPUAccelerator)


def index_devices(devices: Optional[list[torch.device]]) -> Optional[list[torch.device]]:
    """``[cpu, cpu]`` -> ``[cpu:0, cpu:1]`` (tensors on ``cpu:i`` are ordinary CPU tensors)."""
    if devices is None:
        return None
    return [
        torch.device("cpu", i) if d.type == "cpu" and d.index is None else d for i, d in enumerate(devices)
    ]


def prepare_deepspeed_for_cpu() -> None:
    """Make DeepSpeed pick its CPU accelerator; must run before ``deepspeed`` is first imported."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "deepspeed.accelerator.real_accelerator" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError(
                "DeepSpeed was imported with a GPU accelerator but training runs on CPU; set DS_ACCELERATOR=cpu "
                "before importing deepspeed (lightning_ulysses sets it on import when no GPU is present)."
            )
