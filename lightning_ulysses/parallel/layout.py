"""The parallel layout: how the world splits into sequence-parallel (SP) and data-parallel (DP) groups.

Every other module asks a :class:`ParallelLayout` (pure arithmetic, no process groups) or a
:class:`ProcessGroups` (the layout plus the torch groups built from it) instead of passing loose
integers around.

``sp`` is the number of ranks that share one sequence (the context-parallel degree). It factors as
``sp = ulysses x ring``: a Ulysses all-to-all (heads <-> sequence) inside groups of ``ulysses``
ranks, and ring attention (K/V passed around) over groups of ``ring`` ranks. Ulysses is capped by the
head counts; the ring is not, so any ``sp`` that divides the world is possible.

Rank placement: SP groups are *contiguous* blocks of ranks (``[0..sp-1], [sp..2sp-1], ...``), and
inside one, Ulysses groups are contiguous sub-blocks (the all-to-all wants NVLink, so a Ulysses
group that fits in a node stays in it) while ring groups are strided by ``ulysses`` (point-to-point
K/V passing tolerates slower links). DP groups are strided (``{r, r+sp, r+2sp, ...}``) and only
carry the gradient reduction.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, NoReturn, Optional, Union

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_info

from lightning_ulysses.models.inspect import attention_spec, check_shardable
from lightning_ulysses.parallel.ring import RING_BACKENDS

SPSize = Union[int, Literal["auto"]]
CONTEXT_PARALLEL_MODES = ("auto", "hybrid", "ulysses_only", "ring_only")
# dtype of the attention all-to-alls (``seq_parallel_communication_data_type``)
COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Attention implementations the Ulysses wrapper knows how to run on the gathered sequence: it drops the shard-local
# mask HF builds and re-derives causality (and packed samples, sliding windows) from the global position_ids —
# as is_causal / per-segment calls for sdpa, varlen cu_seqlens for the flash kernels, a rebuilt mask for "eager" (which
# materialises [S, S] scores per local head: for short sequences, or models that have nothing else, such as
# Gemma-2's logit soft-capping without flash-attn).
SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3", "eager")


def _max_positions(model: torch.nn.Module) -> Optional[int]:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "max_position_embeddings", None)


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
    if attn_implementation == "flex_attention":
        raise ValueError(
            f"Sequence parallelism (sp={sp}) does not support attn_implementation='flex_attention' yet: its block "
            "mask is built for the whole sequence on one rank and the Ulysses path does not shard it. Build the model "
            f"with attn_implementation set to one of {list(SUPPORTED_ATTN_IMPLEMENTATIONS)} (e.g. "
            "CausalLMModule(attn_implementation='sdpa')); "
            "flex_attention works with sequence_parallel_size=1."
        )
    if attn_implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"Sequence parallelism (sp={sp}) does not support attn_implementation={attn_implementation!r}: the "
            "Ulysses path re-masks the gathered sequence for the attention kinds it knows, and this one is not tested "
            f"under it. Build the model with attn_implementation set to one of {list(SUPPORTED_ATTN_IMPLEMENTATIONS)} "
            "(e.g. `AutoModelForCausalLM.from_config(cfg, attn_implementation='sdpa')`, or "
            "`CausalLMModule(attn_implementation='sdpa')`)."
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def decompose_context_parallel(
    sp: int,
    num_heads: int,
    num_kv_heads: int,
    mode: str = "auto",
    ulysses_size: Optional[int] = None,
    ring_size: Optional[int] = None,
    gpus_per_node: Optional[int] = None,
) -> tuple[int, int]:
    """Split ``sp`` ranks per sequence into ``(ulysses, ring)`` with ``ulysses * ring == sp``.

    ``"auto"``: the largest Ulysses degree that divides ``sp`` and that the heads allow (all-to-all
    moves each token once; a ring passes K/V ``ring - 1`` times), restricted to degrees that keep
    the Ulysses group inside one node when ``gpus_per_node`` is known. 9 heads on 6 ranks -> 3 x 2;
    9 heads on 4 -> 1 x 4. ``"hybrid"``: the same, but both factors must be > 1. ``"ulysses_only"`` /
    ``"ring_only"``: one factor is ``sp``. ``ulysses_size`` / ``ring_size`` override (one is enough).
    """
    if mode not in CONTEXT_PARALLEL_MODES:
        raise ValueError(f"context_parallel_mode must be one of {list(CONTEXT_PARALLEL_MODES)}, got {mode!r}.")
    for name, value in (("ulysses_size", ulysses_size), ("ring_size", ring_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
    valid = [u for u in _divisors(sp) if heads_allow(u, num_heads, num_kv_heads)]
    heads_text = f"num_attention_heads={num_heads}, num_key_value_heads={num_kv_heads}"
    if ulysses_size is not None or ring_size is not None:
        return _manual_decomposition(sp, num_heads, num_kv_heads, ulysses_size, ring_size, valid)
    if mode == "ulysses_only":
        if not heads_allow(sp, num_heads, num_kv_heads):
            raise ValueError(
                f"sequence_parallel_size={sp} cannot split the model's heads ({heads_text}) with Ulysses alone: it "
                f"needs num_attention_heads % sp == 0 and either num_key_value_heads % sp == 0 or "
                f"sp % num_key_value_heads == 0. Ulysses degrees that divide {sp} and the heads allow: {valid}; use "
                "context_parallel_mode='auto' (adds a ring dimension) or a smaller sequence_parallel_size."
            )
        return sp, 1
    if mode == "ring_only":
        return 1, sp
    candidates = valid
    if gpus_per_node is not None and gpus_per_node > 0:
        in_node = [u for u in valid if u <= gpus_per_node and gpus_per_node % u == 0]
        candidates = in_node or valid
    if mode == "hybrid":
        candidates = [u for u in candidates if 1 < u < sp]
        if not candidates:
            raise ValueError(
                f"context_parallel_mode='hybrid' needs a Ulysses degree strictly between 1 and {sp} that divides it "
                f"and splits the heads ({heads_text}); there is none. Use 'auto', 'ring_only', or another "
                "sequence_parallel_size."
            )
    u = max(candidates)
    return u, sp // u


def _manual_decomposition(
    sp: int, num_heads: int, num_kv_heads: int, ulysses_size: Optional[int], ring_size: Optional[int], valid: list[int]
) -> tuple[int, int]:
    """``(ulysses, ring)`` from a ``ulysses_size`` and/or ``ring_size`` given by hand, checked against ``sp`` and the heads."""
    heads_text = f"num_attention_heads={num_heads}, num_key_value_heads={num_kv_heads}"
    if ulysses_size is not None and ring_size is not None and ulysses_size * ring_size != sp:
        raise ValueError(
            f"ulysses_size={ulysses_size} x ring_size={ring_size} = {ulysses_size * ring_size} must equal the "
            f"sequence-parallel degree {sp}; set sequence_parallel_size={ulysses_size * ring_size} or change them."
        )
    given, name = (ulysses_size, "ulysses_size") if ulysses_size is not None else (ring_size, "ring_size")
    if sp % given != 0:  # type: ignore[operator]
        raise ValueError(
            f"{name}={given} does not divide the sequence-parallel degree {sp}; use one of {_divisors(sp)}."
        )
    u = ulysses_size if ulysses_size is not None else sp // ring_size  # type: ignore[operator]
    if not heads_allow(u, num_heads, num_kv_heads):
        raise ValueError(
            f"ulysses_size={u} cannot split the model's heads ({heads_text}); Ulysses degrees that divide "
            f"{sp} and the heads allow: {valid}. Put the rest on the ring (ring_size={sp // max(valid)})."
        )
    return u, sp // u


def check_sp_options(
    sequence_parallel_size: SPSize,
    context_parallel_size: Optional[int],
    context_parallel_mode: str,
    ring_attention_backend: str,
    pad_to_multiple_of: Optional[int],
    seq_parallel_communication_data_type: Optional[str],
) -> SPSize:
    """The strategy's sequence-parallel options, checked with messages that name the fix; returns the SP degree."""
    if context_parallel_size is not None:
        if sequence_parallel_size not in ("auto", context_parallel_size):
            raise ValueError(
                f"sequence_parallel_size={sequence_parallel_size!r} and context_parallel_size={context_parallel_size!r} "
                "name the same thing (ranks per sequence); give only one."
            )
        sequence_parallel_size = context_parallel_size
    if context_parallel_mode not in CONTEXT_PARALLEL_MODES:
        raise ValueError(
            f"context_parallel_mode must be one of {list(CONTEXT_PARALLEL_MODES)}, got {context_parallel_mode!r}."
        )
    if ring_attention_backend not in RING_BACKENDS:
        raise ValueError(f"ring_attention_backend must be one of {list(RING_BACKENDS)}, got {ring_attention_backend!r}.")
    if sequence_parallel_size != "auto" and (
        not isinstance(sequence_parallel_size, int) or isinstance(sequence_parallel_size, bool) or sequence_parallel_size < 1
    ):
        raise ValueError(
            f"sequence_parallel_size must be a positive int or 'auto', got {sequence_parallel_size!r}."
        )
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of}.")
    if seq_parallel_communication_data_type is not None and seq_parallel_communication_data_type not in COMM_DTYPES:
        raise ValueError(
            f"seq_parallel_communication_data_type must be one of {list(COMM_DTYPES)} or None, "
            f"got {seq_parallel_communication_data_type!r}."
        )
    return sequence_parallel_size


def collective_timeout(timeout: Union[float, timedelta, None]) -> Optional[timedelta]:
    """How long a rank waits in a collective (seconds or a ``timedelta``; ``None``: the backend's default)."""
    if timeout is None or isinstance(timeout, timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds or a timedelta, got {timeout!r}.")
    return timedelta(seconds=float(timeout))


@dataclass(frozen=True)
class ParallelLayout:
    """Validated degrees of the world: ``world_size = sp * dp`` and ``sp = ulysses * ring``.

    Construct it with :meth:`resolve`, which turns ``"auto"`` into a number and checks the request
    against the model's head counts, so that an impossible layout fails before any group is built.
    """

    world_size: int
    sp: int
    ring: int = 1

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
        if not isinstance(self.ring, int) or self.ring < 1 or self.sp % self.ring != 0:
            raise ValueError(f"ring size {self.ring!r} must be a positive divisor of sequence_parallel_size={self.sp}.")

    @classmethod
    def resolve(
        cls,
        sequence_parallel_size: SPSize,
        world_size: int,
        num_heads: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        attn_implementation: Optional[str] = None,
        mode: str = "auto",
        ulysses_size: Optional[int] = None,
        ring_size: Optional[int] = None,
        gpus_per_node: Optional[int] = None,
    ) -> "ParallelLayout":
        """Resolve ``"auto"`` and validate an explicit degree against world size and head counts.

        ``sequence_parallel_size="auto"`` with ``ulysses_size`` and/or ``ring_size`` given means their product (a
        missing one is 1); otherwise ``"auto"`` is the largest Ulysses-only degree (no ring) the heads allow.
        """
        if num_kv_heads is None:
            num_kv_heads = num_heads
        if sequence_parallel_size == "auto" and (ulysses_size is not None or ring_size is not None):
            sequence_parallel_size = (ulysses_size or 1) * (ring_size or 1)  # what was asked for, checked below
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
        cls(world_size=world_size, sp=sp)  # validates sp against the world before decomposing it
        ring = 1
        if sp > 1 and num_heads is None:
            # No model to check against (unit use): take the request literally.
            if ulysses_size is not None or ring_size is not None:
                ring = ring_size if ring_size is not None else sp // ulysses_size  # type: ignore[operator]
            elif mode == "ring_only":
                ring = sp
        elif sp > 1:
            _, ring = decompose_context_parallel(
                sp, num_heads, num_kv_heads, mode, ulysses_size, ring_size, gpus_per_node  # type: ignore[arg-type]
            )
        layout = cls(world_size=world_size, sp=sp, ring=ring)
        validate_attn_implementation(attn_implementation, sp)
        return layout

    @classmethod
    def for_model(
        cls,
        model: Optional[torch.nn.Module],
        sequence_parallel_size: SPSize,
        world_size: int,
        *,
        mode: str = "auto",
        ulysses_size: Optional[int] = None,
        ring_size: Optional[int] = None,
        gpus_per_node: Optional[int] = None,
    ) -> "ParallelLayout":
        """The layout for the HF ``model`` (``None``: the LightningModule holds none): :meth:`resolve` with its head
        counts and attention implementation. A model that mixes tokens outside attention (an SSM layer) gets sp=1
        under ``"auto"`` and an error when sequence parallelism was asked for."""
        asked = sequence_parallel_size not in ("auto", 1) or (ulysses_size or 1) * (ring_size or 1) > 1
        if model is None:
            if asked or (sequence_parallel_size == "auto" and world_size > 1):
                raise ValueError(
                    "UlyssesDeepSpeedStrategy could not find a transformers PreTrainedModel inside the LightningModule; "
                    "create it in __init__ or configure_model (e.g. self.model = AutoModelForCausalLM.from_config(...)), "
                    "or use sequence_parallel_size=1."
                )
            return cls.resolve(1, world_size)
        try:
            check_shardable(model, 2)
        except ValueError:
            if asked:
                raise
            if sequence_parallel_size == "auto" and world_size > 1:
                rank_zero_info(
                    f"lightning_ulysses: {type(model).__name__} mixes tokens with more than attention and cannot be "
                    "sequence-sharded; sequence_parallel_size='auto' -> 1 (data parallel only)."
                )
            return cls.resolve(1, world_size)
        heads, kv_heads, impl = attention_spec(model)
        return cls.resolve(
            sequence_parallel_size, world_size, heads, kv_heads, impl, mode=mode, ulysses_size=ulysses_size,
            ring_size=ring_size, gpus_per_node=gpus_per_node,
        )

    def check_companion(self, model: torch.nn.Module, name: str, trained: Optional[torch.nn.Module] = None,
                        seq_len: Optional[int] = None) -> None:
        """Refuse a frozen model run next to the trained one (a DPO reference, a distillation teacher) that this
        layout cannot run: it sees the same sharded batch under the same attention, so its layers must be shardable
        and its heads split at this layout's Ulysses degree (chosen for the trained model); and with ``seq_len``
        known, it must handle as many positions as the trained model does for that length (``max_position_embeddings``
        of a frozen model that is shorter than both: its distributions past it would be extrapolated)."""
        kind = type(model).__name__
        if self.sp_enabled:
            check_shardable(model, self.sp)
            heads, kv, _ = attention_spec(model)
            if not heads_allow(self.ulysses, heads, kv):
                raise ValueError(
                    f"The frozen model `{name}` ({kind}, num_attention_heads={heads}, num_key_value_heads={kv}) cannot run at this "
                    f"layout: Ulysses degree {self.ulysses} (chosen for the trained model's heads) does not split its "
                    f"heads. Use one whose heads the degree divides, a sequence_parallel_size / ulysses_size "
                    f"that both models' heads allow, or context_parallel_mode='ring_only' (a ring splits no heads)."
                )
        if seq_len is None:
            return
        ours = _max_positions(model)
        theirs = _max_positions(trained) if trained is not None else None
        if ours is not None and ours < seq_len and (theirs is None or ours < theirs):
            raise ValueError(
                f"The frozen model `{name}` ({kind}) handles {ours:,} positions (max_position_embeddings), fewer than the "
                f"{seq_len:,} tokens per sequence of this run"
                + (f" and the trained model's {theirs:,}" if theirs is not None else "")
                + f": its outputs past {ours:,} would be extrapolated. Use one trained for this length, shorter "
                f"sequences, or, if it does extrapolate (rope_scaling), set its max_position_embeddings."
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    @property
    def ulysses(self) -> int:
        return self.sp // self.ring

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    def sp_rank(self, rank: int) -> int:
        return rank % self.sp

    def dp_rank(self, rank: int) -> int:
        return rank // self.sp

    def ulysses_rank(self, rank: int) -> int:
        return self.sp_rank(rank) % self.ulysses

    def ring_rank(self, rank: int) -> int:
        return self.sp_rank(rank) // self.ulysses

    def sp_group_ranks(self) -> list[list[int]]:
        return [list(range(g * self.sp, (g + 1) * self.sp)) for g in range(self.dp)]

    def dp_group_ranks(self) -> list[list[int]]:
        return [list(range(i, self.world_size, self.sp)) for i in range(self.sp)]

    def ulysses_group_ranks(self) -> list[list[int]]:
        u = self.ulysses
        return [list(range(start, start + u)) for start in range(0, self.world_size, u)]

    def ring_group_ranks(self) -> list[list[int]]:
        u = self.ulysses
        return [
            list(range(base + i, base + self.sp, u)) for base in range(0, self.world_size, self.sp) for i in range(u)
        ]

    def describe(self, num_nodes: int = 1) -> str:
        """One line for the log: degrees, groups, and where they sit when ranks span ``num_nodes`` nodes
        (ranks are node-major: node ``n`` holds ranks ``[n * per_node, (n + 1) * per_node)``)."""
        text = f"world={self.world_size} = sp {self.sp} x dp {self.dp} (SP groups: {self.sp_group_ranks()})"
        if self.ring > 1:
            text += f"; sp = ulysses {self.ulysses} x ring {self.ring} (ring groups: {self.ring_group_ranks()})"
        if num_nodes > 1 and self.world_size % num_nodes == 0:
            text += f"; {self.placement(num_nodes)}"
        return text

    def placement(self, num_nodes: int) -> str:
        """Whether the all-to-all groups stay inside a node (fast links) or cross nodes."""
        per_node = self.world_size // num_nodes
        where = f"{num_nodes} nodes x {per_node} processes"
        if self.sp == 1:
            return f"{where}: no sequence parallelism, only data-parallel traffic crosses nodes"
        if per_node % self.sp == 0:
            return f"{where}: every SP group inside one node, only data-parallel traffic crosses nodes"
        if per_node % self.ulysses == 0:
            return f"{where}: every Ulysses group inside one node, ring groups cross nodes"
        return (
            f"{where}: Ulysses groups of {self.ulysses} cross nodes (slow all-to-all); a ring dimension "
            "(context_parallel_mode='auto' or 'hybrid') keeps Ulysses inside a node"
        )


@dataclass
class ProcessGroups:
    """The torch process groups of a layout, as seen from one rank.

    ``sp_group`` is None when sp == 1 (no collective is ever needed along it); likewise
    ``ulysses_group`` when ulysses == 1 and ``ring_group`` when ring == 1.
    """

    layout: ParallelLayout
    rank: int
    sp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    world_group: Optional[dist.ProcessGroup]
    ulysses_group: Optional[dist.ProcessGroup] = None
    ring_group: Optional[dist.ProcessGroup] = None

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
        ulysses_group = ring_group = None
        if layout.ring > 1:
            if layout.ulysses > 1:
                for ranks in layout.ulysses_group_ranks():
                    group = dist.new_group(ranks)
                    if rank in ranks:
                        ulysses_group = group
            for ranks in layout.ring_group_ranks():
                group = dist.new_group(ranks)
                if rank in ranks:
                    ring_group = group
        elif layout.sp > 1:
            ulysses_group = sp_group
        # ZeRO shards and reduces over every rank (SP ranks hold replicas of the same parameters).
        world_group = dist.new_group(list(range(layout.world_size)))
        return cls(
            layout=layout,
            rank=rank,
            sp_group=sp_group if layout.sp > 1 else None,
            dp_group=dp_group,
            world_group=world_group,
            ulysses_group=ulysses_group,
            ring_group=ring_group,
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

    @property
    def ulysses(self) -> int:
        return self.layout.ulysses

    @property
    def ring(self) -> int:
        return self.layout.ring

    @property
    def ulysses_rank(self) -> int:
        return self.layout.ulysses_rank(self.rank)

    @property
    def ring_rank(self) -> int:
        return self.layout.ring_rank(self.rank)

    def deepspeed_mpu(self) -> "DeepSpeedSequenceParallelMPU":
        return DeepSpeedSequenceParallelMPU(self)


class DeepSpeedSequenceParallelMPU:
    """The ``mpu`` object DeepSpeed's engine expects for Ulysses, backed by our groups.

    DeepSpeed recognises a *sequence-parallel* mpu by the presence of ``initialize_sequence_parallel``
    (``deepspeed.utils.groups``): it then shards ZeRO state and reduces gradients over the
    "sequence data parallel" group (all ranks) and treats model parallelism as absent. The
    ``get_model_parallel_*`` aliases mirror ``deepspeed.runtime.sequence_parallel.parallel_state_sp``
    so that gradient-norm code deduplicates the SP replicas exactly as DeepSpeed's own path does.
    Those aliases are also what ZeRO-0 (BF16_Optimizer) reads: DeepSpeed's own module crashes there
    (deepspeedai/DeepSpeed#7833). Tensor parallelism is reported as absent (degree 1), which is what makes a
    checkpoint convertible to DeepSpeed's universal format, and so resumable at another layout.
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

    def get_tensor_model_parallel_world_size(self) -> int:
        """No tensor parallelism: every SP rank holds whole parameters. DeepSpeed prefers this accessor over the
        model-parallel alias when it records a checkpoint's ``tp_degree``; with the alias it would record the SP
        degree, and its universal-checkpoint converter would then look for TP slices that do not exist. (The
        *rank* keeps falling back to the SP rank: the gradient-norm code counts replicated parameters on SP rank 0
        only, then sums over the SP group.)"""
        return 1


def rank_in_group(group: Optional[dist.ProcessGroup]) -> int:
    """This process's rank inside ``group`` (0 without one)."""
    return dist.get_rank(group) if group is not None else 0


def shutdown_distributed() -> None:
    """Synchronise and destroy the default process group before the interpreter exits.

    Lightning leaves it alive after ``fit``; on CPU a rank that exits with live gloo groups while
    others still work can abort ("terminate called without an active exception"), failing the job.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_distributed(code: int = 0) -> NoReturn:
    """End this process after its distributed work: :func:`shutdown_distributed`, then what the interpreter's exit
    would run (non-daemon threads joined, ``atexit`` handlers such as loggers' final uploads, stdio flushed), then
    ``os._exit(code)``, skipping the interpreter's finalization. Call it last in a training script; the CLI does.

    Why: ``destroy_process_group`` only unregisters groups; their C++ backends live on while anything references
    them (DeepSpeed's engine and optimizer, every parameter's ``_dp_group``), with their worker threads. A gloo
    worker thread drops a finished collective's tensors a moment after the collective completes; when Python has
    already let go of such a tensor, that release decrefs its Python object and so takes the GIL. Once the
    interpreter is finalizing, CPython ends any thread that asks for the GIL with ``pthread_exit``; its forced
    unwinding reaches a ``noexcept`` destructor (``TensorImpl`` release in ``ProcessGroupGloo::runLoop``) and
    calls ``std::terminate``: the process aborts with "terminate called without an active exception" (exit -6)
    although training succeeded. It takes a worker thread descheduled at that instant, so it is rare (CPU ranks
    outnumbering cores make it likelier); without finalization there is nothing for such a thread to race.
    """
    shutdown_distributed()
    for thread in threading.enumerate():  # what finalization does first: wait for non-daemon threads
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # stdlib-private; runs (and clears) the handlers finalization would run next
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # replaced or already closed streams
            pass
    os._exit(code)


__all__ = [
    "COMM_DTYPES",
    "CONTEXT_PARALLEL_MODES",
    "check_sp_options",
    "collective_timeout",
    "rank_in_group",
    "SPSize",
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "decompose_context_parallel",
    "ParallelLayout",
    "ProcessGroups",
    "DeepSpeedSequenceParallelMPU",
    "auto_sequence_parallel_size",
    "heads_allow",
    "exit_distributed",
    "shutdown_distributed",
    "validate_attn_implementation",
]
