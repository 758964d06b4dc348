"""The parallel layout: how the world splits into sequence-parallel (SP) and data-parallel (DP) groups.

Every other module asks a :class:`ParallelLayout` (pure arithmetic, no process groups) or a
:class:`ProcessGroups` (the layout plus the torch groups built from it) instead of passing loose
integers around.

Rank placement: SP groups are *contiguous* blocks of ranks (``[0..sp-1], [sp..2sp-1], ...``), so on a
multi-GPU node the heavy all-to-alls of one SP group stay on NVLink; DP groups are strided
(``{r, r+sp, r+2sp, ...}``) and only carry the gradient reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch.distributed as dist

SPSize = Union[int, Literal["auto"]]

# Attention implementations whose HF kernels never need a materialised 4D mask, so the Ulysses
# wrapper can drop the shard-local mask HF builds and re-derive causality from global position_ids.
SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3")


def heads_allow(sp: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether Ulysses can split ``num_heads`` query / ``num_kv_heads`` kv heads over ``sp`` ranks.

    Query heads must divide evenly. KV heads either divide evenly too, or (kv < sp) are replicated
    ``sp // kv`` times, which needs ``sp % kv == 0`` so each rank's query heads map to one kv head.
    """
    return num_heads % sp == 0 and (num_kv_heads % sp == 0 or sp % num_kv_heads == 0)


def auto_sequence_parallel_size(world_size: int, num_heads: int, num_kv_heads: int) -> int:
    """The largest SP degree that divides ``world_size`` and that the head counts allow."""
    return max(s for s in range(1, world_size + 1) if world_size % s == 0 and heads_allow(s, num_heads, num_kv_heads))


def validate_attn_implementation(attn_implementation: Optional[str], sp: int) -> None:
    if sp == 1:
        return
    if attn_implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"Sequence parallelism (sp={sp}) does not support attn_implementation={attn_implementation!r}: "
            "eager attention needs a full [seq, seq] mask per head and cannot be sharded. Build the model with "
            f"attn_implementation set to one of {list(SUPPORTED_ATTN_IMPLEMENTATIONS)} (e.g. "
            "`AutoModelForCausalLM.from_config(cfg, attn_implementation='sdpa')`, or "
            "`CausalLMModule(attn_implementation='sdpa')`)."
        )


@dataclass(frozen=True)
class ParallelLayout:
    """Validated degrees of the world: ``world_size = sp * dp``.

    Construct it with :meth:`resolve`, which turns ``"auto"`` into a number and checks the request
    against the model's head counts, so that an impossible layout fails before any group is built.
    """

    world_size: int
    sp: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}.")
        if not isinstance(self.sp, int) or isinstance(self.sp, bool) or self.sp < 1:
            raise ValueError(
                f"sequence_parallel_size must be a positive int or 'auto', got {self.sp!r}."
            )
        if self.sp > self.world_size:
            raise ValueError(
                f"sequence_parallel_size={self.sp} is larger than the world size {self.world_size}: launch at least "
                f"{self.sp} processes (Trainer(devices=..., num_nodes=...)) or lower sequence_parallel_size."
            )
        if self.world_size % self.sp != 0:
            divisors = [s for s in range(1, self.world_size + 1) if self.world_size % s == 0]
            raise ValueError(
                f"sequence_parallel_size={self.sp} does not divide the world size {self.world_size}; the rest of the "
                f"world would not form whole data-parallel groups. Use one of {divisors}."
            )

    @classmethod
    def resolve(
        cls,
        sequence_parallel_size: SPSize,
        world_size: int,
        num_heads: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        attn_implementation: Optional[str] = None,
    ) -> "ParallelLayout":
        """Resolve ``"auto"`` and validate an explicit degree against world size and head counts."""
        if num_kv_heads is None:
            num_kv_heads = num_heads
        if sequence_parallel_size == "auto":
            if num_heads is None:
                raise ValueError(
                    "sequence_parallel_size='auto' needs the model's head counts; pass an int instead, or let the "
                    "strategy resolve it after the model is built."
                )
            sp = auto_sequence_parallel_size(world_size, num_heads, num_kv_heads)
        elif isinstance(sequence_parallel_size, str):
            raise ValueError(
                f"sequence_parallel_size must be a positive int or 'auto', got {sequence_parallel_size!r}."
            )
        else:
            sp = sequence_parallel_size
        layout = cls(world_size=world_size, sp=sp)
        if num_heads is not None and sp > 1 and not heads_allow(sp, num_heads, num_kv_heads):
            allowed = [s for s in range(1, world_size + 1) if world_size % s == 0 and heads_allow(s, num_heads, num_kv_heads)]
            raise ValueError(
                f"sequence_parallel_size={sp} cannot split the model's heads (num_attention_heads={num_heads}, "
                f"num_key_value_heads={num_kv_heads}): Ulysses needs num_attention_heads % sp == 0 and either "
                f"num_key_value_heads % sp == 0 or sp % num_key_value_heads == 0. Valid degrees for world size "
                f"{world_size}: {allowed} (or sequence_parallel_size='auto')."
            )
        validate_attn_implementation(attn_implementation, sp)
        return layout

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    def sp_rank(self, rank: int) -> int:
        return rank % self.sp

    def dp_rank(self, rank: int) -> int:
        return rank // self.sp

    def sp_group_ranks(self) -> list[list[int]]:
        return [list(range(g * self.sp, (g + 1) * self.sp)) for g in range(self.dp)]

    def dp_group_ranks(self) -> list[list[int]]:
        return [list(range(i, self.world_size, self.sp)) for i in range(self.sp)]

    def describe(self) -> str:
        return f"world={self.world_size} = sp {self.sp} x dp {self.dp} (SP groups: {self.sp_group_ranks()})"


@dataclass
class ProcessGroups:
    """The torch process groups of a layout, as seen from one rank.

    ``sp_group`` is None when sp == 1 (no collective is ever needed along it).
    """

    layout: ParallelLayout
    rank: int
    sp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    world_group: Optional[dist.ProcessGroup]

    @classmethod
    def build(cls, layout: ParallelLayout) -> "ProcessGroups":
        """Create the groups. Collective: every rank must call it, in the same order."""
        if not dist.is_available() or not dist.is_initialized():
            if layout.world_size != 1:
                raise RuntimeError("torch.distributed must be initialised before building SP groups.")
            return cls(layout=layout, rank=0, sp_group=None, dp_group=None, world_group=None)
        if dist.get_world_size() != layout.world_size:
            raise RuntimeError(
                f"Layout world size {layout.world_size} != torch.distributed world size {dist.get_world_size()}."
            )
        rank = dist.get_rank()
        sp_group = dp_group = None
        # new_group is collective over the *world*: every rank creates every group, keeps its own.
        for ranks in layout.sp_group_ranks():
            group = dist.new_group(ranks)
            if rank in ranks:
                sp_group = group
        for ranks in layout.dp_group_ranks():
            group = dist.new_group(ranks)
            if rank in ranks:
                dp_group = group
        # ZeRO shards and reduces over every rank (SP ranks hold replicas of the same parameters).
        world_group = dist.new_group(list(range(layout.world_size)))
        return cls(
            layout=layout,
            rank=rank,
            sp_group=sp_group if layout.sp > 1 else None,
            dp_group=dp_group,
            world_group=world_group,
        )

    @property
    def sp_rank(self) -> int:
        return self.layout.sp_rank(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.rank)

    @property
    def sp(self) -> int:
        return self.layout.sp

    @property
    def dp(self) -> int:
        return self.layout.dp

    def deepspeed_mpu(self) -> "DeepSpeedSequenceParallelMPU":
        return DeepSpeedSequenceParallelMPU(self)


class DeepSpeedSequenceParallelMPU:
    """The ``mpu`` object DeepSpeed's engine expects for Ulysses, backed by our groups.

    DeepSpeed recognises a *sequence-parallel* mpu by the presence of ``initialize_sequence_parallel``
    (``deepspeed.utils.groups``): it then shards ZeRO state and reduces gradients over the
    "sequence data parallel" group (all ranks) and treats model parallelism as absent. The
    ``get_model_parallel_*`` aliases mirror ``deepspeed.runtime.sequence_parallel.parallel_state_sp``
    so that gradient-norm code deduplicates the SP replicas exactly as DeepSpeed's own path does.
    The tensor-parallel accessors are what makes ZeRO-0 (BF16_Optimizer) work: DeepSpeed's own
    module lacks them and crashes there (deepspeedai/DeepSpeed#7833).
    """

    def __init__(self, groups: ProcessGroups) -> None:
        self._groups = groups

    def initialize_sequence_parallel(self, *args, **kwargs) -> None:  # marker attribute for DeepSpeed
        raise RuntimeError("lightning_ulysses builds its groups itself; this mpu is already initialised.")

    def get_sequence_parallel_group(self):
        return self._groups.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self._groups.sp

    def get_sequence_parallel_rank(self) -> int:
        return self._groups.sp_rank

    def get_sequence_data_parallel_group(self):
        return self._groups.world_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self._groups.layout.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self._groups.rank

    get_model_parallel_group = get_sequence_parallel_group
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_rank = get_sequence_parallel_rank


def shutdown_distributed() -> None:
    """Synchronise and destroy the default process group before the interpreter exits.

    Lightning leaves it alive after ``fit``; on CPU a rank that exits with live gloo groups while
    others still work can abort ("terminate called without an active exception"), failing the job.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = [
    "SPSize",
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "ParallelLayout",
    "ProcessGroups",
    "DeepSpeedSequenceParallelMPU",
    "auto_sequence_parallel_size",
    "heads_allow",
    "shutdown_distributed",
    "validate_attn_implementation",
]
