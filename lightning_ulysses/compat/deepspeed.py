"""DeepSpeed's private APIs (checked against deepspeed 0.19.x)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from typing import Any

from torch import Tensor

CHECKED = "deepspeed>=0.19,<0.20"


def is_zero3_params(params: Iterable[Tensor]) -> bool:
    """Whether these parameters are ZeRO-3 partitioned (DeepSpeed tags them with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in params)


def zero3_calls(count: int, params: Iterable[Tensor], device: Any = None) -> int:
    """How many times this rank calls a module holding ``params`` when it needs ``count`` calls: under ZeRO-3 each
    call (and its backward) all-gathers the partitioned parameters over their group (``ds_process_group``), a
    collective every rank of it must join as often as the others, while ranks need different counts (other
    data-parallel groups have other batches) -- so the group's largest count (one all-reduce of one number; the
    extra calls run on empty inputs). ``count`` itself when no parameter is partitioned."""
    import torch
    import torch.distributed as dist

    group = next((getattr(p, "ds_process_group", None) for p in params if hasattr(p, "ds_id")), False)
    if group is False or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return count
    most = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    return int(most.item())


def set_zero3_grads_ready(params: Iterable[Tensor], ready: bool) -> None:
    """ZeRO-3 reduces a parameter's gradient in the backward hook only when ``ds_grad_is_ready`` is True: a module
    run several times in one backward (tiles) marks all but its last run not ready."""
    for p in params:
        p.ds_grad_is_ready = ready


def use_mpu(mpu: Any) -> None:
    """Make ``mpu`` (or ``None``: plain world groups) the one DeepSpeed's reductions read.

    DeepSpeed keeps the ``mpu`` of the last engine built *with* one in a module global (``deepspeed.utils.groups.mpu``)
    and reads the DP / sequence-DP groups from it on every reduction; an engine built later *without* one does not
    reset it. A second fit in the same process at sp=1 after one at sp>1 would then reduce its gradients over the
    previous layout's groups (found by running parity cases one after another in one process)."""
    from deepspeed.utils import groups

    groups.mpu = mpu


@contextmanager
def zero_init_paused() -> Iterator[None]:
    """Build modules as plain tensors inside an active ``deepspeed.zero.Init`` (
    ``shutdown_init_context`` / ``restore_init_context``, which the engine itself uses).

    For small modules added to a partitioned model (LoRA adapters): their constructors' in-place inits
    (``zeros_``, ``kaiming_uniform_``) would run on empty partitions and be lost. The engine partitions
    such parameters when it is built.
    """
    import sys

    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    active = zero is not None and zero.top_level_context is not None
    if active:
        zero.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            zero.restore_init_context()


def convert_to_universal(tag_dir: str, out_dir: str, workers: int = 1) -> None:
    """DeepSpeed's ``ds_to_universal`` converter (``python -m deepspeed.checkpoint.ds_to_universal``) as a call:
    the ZeRO shards of ``tag_dir`` -> one folder per parameter (fp32 weights and optimizer moments, any partition
    count) in ``out_dir``. ``inject_missing_state``: the converter otherwise expects Megatron's
    ``universal_checkpoint_info`` in the client state, which only Megatron-DeepSpeed writes."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main

    main(argparse.Namespace(input_folder=tag_dir, output_folder=out_dir, num_extract_workers=workers,
                            num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                            inject_missing_state=True))


class _NoTensorParallel:
    """An ``mpu`` view for universal-checkpoint loading: tensor-parallel rank 0 of 1, so each rank reads whole
    parameters (the loader slices a parameter by TP rank, and our mpu's TP *rank* is the SP rank; see
    ``DeepSpeedSequenceParallelMPU``). Everything else is the wrapped mpu's."""

    def __init__(self, mpu: Any) -> None:
        self._mpu = mpu

    def get_tensor_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mpu, name)


@contextmanager
def universal_loading(engine: Any) -> Iterator[None]:
    """Make ``engine.load_checkpoint`` read a universal checkpoint (what ``"checkpoint": {"load_universal": true}``
    in the config does, for one load) with whole parameters on every rank."""
    config, optimizer = engine._config, getattr(engine, "optimizer", None)
    mpu = getattr(optimizer, "mpu", None)
    config.load_universal_checkpoint = True
    if mpu is not None:
        optimizer.mpu = _NoTensorParallel(mpu)
    try:
        yield
    finally:
        config.load_universal_checkpoint = False
        if mpu is not None:
            optimizer.mpu = mpu


__all__ = ["CHECKED", "convert_to_universal", "is_zero3_params", "set_zero3_grads_ready", "universal_loading",
           "use_mpu", "zero_init_paused"]
