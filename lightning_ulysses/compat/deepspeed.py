"""DeepSpeed's private APIs (checked against deepspeed 0.19.x)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from typing import Any, Optional

from torch import Tensor
from torch.nn import Module

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


def cast_late_parameters(model: Module, config: dict) -> int:
    """Cast the parameters a ZeRO-3 model gained after ``zero.Init`` to the engine's compute dtype; returns how many.

    With bf16 (or fp16) on, DeepSpeed's engine casts every parameter of the model it is given -- unless the model was
    built under ``zero.Init`` (its parameters carry ``ds_id``): then it assumes all of them already have the dtype and
    casts none (``DeepSpeedEngine._cast_module_mixed_precision``). Parameters created outside ``zero.Init`` after the
    build -- PEFT's LoRA adapters, which PEFT upcasts to fp32 -- would stay fp32 at ZeRO-3 only (ZeRO 0-2 cast
    them), and each adapter linear would cast its bf16 input to an fp32 copy kept for backward (four bytes per
    value, once per adapted projection). Casting them here gives every stage the same mixed precision: bf16 compute,
    fp32 master weights in the optimizer."""
    import torch

    dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else (
        torch.float16 if config.get("fp16", {}).get("enabled") else None)
    params = list(model.parameters())
    if dtype is None or not is_zero3_params(params):
        return 0
    late = [p for p in params if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype]
    for p in late:
        p.data = p.data.to(dtype)
    return len(late)


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


def _forward_stack() -> Optional[list]:
    """ZeRO-3's ``parameter_offload.FWD_MODULE_STACK``: a module-level list of the modules whose forward is running
    (each pre-forward hook pushes, each post-forward hook pops), with every ZeRO-3 engine's root at the bottom."""
    import sys

    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    return getattr(offload, "FWD_MODULE_STACK", None)


@contextmanager
def forward_stack_kept() -> Iterator[None]:
    """Run a backward and leave ZeRO-3's forward stack as deep as it was before.

    Activation checkpointing with torch's early stop (which ZeRO-3 needs, see ``checkpoint_kwargs``) ends each
    layer's recompute by raising inside the forward of its last module: the pre-forward hooks of that module and its
    parent (``mlp``, ``mlp.down_proj``) pushed, their post-forward hooks never pop. Unchecked, two entries per
    checkpointed layer and step pile up for the whole run, each holding its module (and through the root, the
    engine) and standing in for the real parent when DeepSpeed registers a module's returned parameter."""
    stack = _forward_stack()
    depth = len(stack) if stack is not None else 0
    try:
        yield
    finally:
        if stack is not None:
            del stack[depth:]


def release_engine(engine: Any) -> None:
    """Drop the references that keep a finished engine (its optimizer: fp32 master weights and moments) alive after
    the last user reference to it is gone; the model keeps running forward (its ZeRO-3 parameter hooks stay), the
    engine keeps its optimizer state for ``save_checkpoint`` while the caller holds it.

    Three roots outlive an engine in DeepSpeed 0.19 (found with ``gc`` after ``del trainer, module``: 825 MiB per fit
    of a tiny ZeRO-3 model, ~30 GiB for 4 layers of an 8B model with AdamW):
    - the optimizer's gradient hooks: closures over the optimizer, held by the parameters' C++ hook lists, which
      ``gc`` cannot see into (ZeRO-1/2/3); they only reduce the gradients of a backward, none runs after fit;
    - ZeRO-3's forward stack (:func:`forward_stack_kept`), to which every engine appends its root module and never
      removes it (the root -> its forward hooks -> the engine);
    - ``PartitionedParameterCoordinator.__params_to_release``, an ``lru_cache`` on a method: its keys hold every
      coordinator (-> the parameters -> ``param._z3_optimizer``) of every engine of the process
      (:func:`clear_zero3_caches`)."""
    optimizer = getattr(engine, "optimizer", None)
    for name in ("_grad_acc_hooks", "_leaf_module_hooks"):
        hooks = getattr(optimizer, name, None)
        if isinstance(hooks, list):
            for handle in hooks:
                handle.remove()
            hooks.clear()
    stack, root = _forward_stack(), getattr(engine, "module", None)
    if stack is not None and isinstance(root, Module):
        own = {id(m) for m in root.modules()}
        stack[:] = [m for m in stack if id(m) not in own]
    clear_zero3_caches()


def clear_zero3_caches() -> None:
    """Empty the class-wide cache of ZeRO-3's parameter coordinator (which parameters a module releases after it ran).
    It is keyed by coordinator, so it holds every engine that ever ran a complete trace, a finished one included;
    clearing only costs the live engines a recomputation on their next step."""
    import sys

    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    cls = getattr(coordinator, "PartitionedParameterCoordinator", None)
    method = getattr(cls, "_PartitionedParameterCoordinator__params_to_release", None)
    # the lru_cache wrapper sits under DeepSpeed's nvtx decorator (which keeps it in a closure, not __wrapped__)
    candidates = [method, getattr(method, "__wrapped__", None)]
    candidates += [cell.cell_contents for cell in getattr(method, "__closure__", None) or ()]
    for candidate in candidates:
        if callable(getattr(candidate, "cache_clear", None)):
            candidate.cache_clear()
            return


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


__all__ = ["CHECKED", "cast_late_parameters", "clear_zero3_caches", "convert_to_universal", "forward_stack_kept",
           "is_zero3_params", "release_engine", "set_zero3_grads_ready", "universal_loading", "use_mpu", "zero3_calls",
           "zero_init_paused"]
