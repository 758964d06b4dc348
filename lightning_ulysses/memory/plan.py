"""Which memory tricks run: the registry, the strategy's flat flags as an alias, and a Trainer's whole plan.

Registering a trick is one line in :data:`TRICKS` (its class lives in its own module); the strategy's flat flags,
the README's table (``tests/test_memory_plan.py`` checks it), the throughput counter and the memory benchmark
all read this list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_ulysses.kernels.impl import check_impl
from lightning_ulysses.memory.checkpointing import GradientCheckpointing
from lightning_ulysses.memory.offload import ActivationOffload, check_keep_layers
from lightning_ulysses.memory.rmsnorm import MemoryEfficientRMSNorm
from lightning_ulysses.memory.swiglu import MemoryEfficientSwiGLU
from lightning_ulysses.memory.tiled_attention import TiledAttentionBackward
from lightning_ulysses.memory.tiled_loss import TiledLoss
from lightning_ulysses.memory.tiled_mlp import TiledMLP
from lightning_ulysses.memory.trick import MemoryTrick, ordered

# every trick, in plan order
TRICKS: tuple[type[MemoryTrick], ...] = tuple(sorted(
    (GradientCheckpointing, TiledLoss, TiledMLP, MemoryEfficientRMSNorm, MemoryEfficientSwiGLU, TiledAttentionBackward,
     ActivationOffload),
    key=lambda cls: cls.order,
))


@dataclass
class MemoryPlan:
    """The strategy's tricks: ``tricks`` at every layout, ``sp_defaults`` only when sequence parallelism is on
    (checkpointing and the tiled loss are on by default under SP unless a flag or an explicit trick says otherwise)."""

    tricks: list[MemoryTrick] = field(default_factory=list)
    sp_defaults: list[MemoryTrick] = field(default_factory=list)

    def resolve(self, sp_enabled: bool) -> list[MemoryTrick]:
        return ordered(self.tricks + (self.sp_defaults if sp_enabled else []))


def tricks_from_flags(  # long: one parameter per flat flag of the strategy, mapped in one place
    memory: Optional[Sequence[MemoryTrick]] = None,
    gradient_checkpointing: Optional[bool] = None,
    checkpoint_policy: str = "full",
    save_attention_layers: Optional[int] = None,
    tiled_loss: Optional[bool] = None,
    tiled_loss_tile_tokens: Optional[int] = None,
    tiled_loss_impl: str = "auto",
    tiled_mlp: bool = False,
    tiled_mlp_tile_tokens: Optional[int] = None,
    memory_efficient_rmsnorm: bool = False,
    memory_efficient_swiglu: bool = False,
    memory_efficient_impl: str = "auto",
    tiled_attention_backward: bool = False,
    tiled_attention_tile_tokens: Optional[int] = None,
    activation_checkpoint_cpu_offload: bool = False,
    activation_checkpoint_cpu_offload_keep_layers: int = 0,
) -> MemoryPlan:
    """The strategy's memory options -> one :class:`MemoryPlan`.

    ``memory``: trick objects (the full options of each). The flat flags (ArcticTraining's names) build the same
    objects; a trick given in ``memory`` replaces the flag-built one of its kind, and giving a kind both ways with
    a non-default flag is an error (which settings win would be a guess).
    """
    if checkpoint_policy != "full" and gradient_checkpointing is False:
        raise ValueError(
            f"checkpoint_policy={checkpoint_policy!r} selects what gradient checkpointing recomputes, but "
            "gradient_checkpointing=False; drop one of the two."
        )
    offload_given = activation_checkpoint_cpu_offload or any(isinstance(t, ActivationOffload) for t in memory or [])
    if offload_given and gradient_checkpointing is False:
        raise ValueError(
            "activation_checkpoint_cpu_offload moves the layer inputs that gradient checkpointing keeps to CPU memory, "
            "so it needs checkpointing, but gradient_checkpointing=False; drop one of the two."
        )
    if activation_checkpoint_cpu_offload_keep_layers and not activation_checkpoint_cpu_offload:
        raise ValueError("activation_checkpoint_cpu_offload_keep_layers only applies with offload: set "
                         "activation_checkpoint_cpu_offload=True (or leave keep_layers at 0).")
    # every flat option is checked whether or not its trick is on, with the flag's own name in the message
    check_impl(memory_efficient_impl, "memory_efficient")
    check_keep_layers(activation_checkpoint_cpu_offload_keep_layers, "activation_checkpoint_cpu_offload_keep_layers")
    for name, value in (("tiled_attention_tile_tokens", tiled_attention_tile_tokens),
                        ("tiled_mlp_tile_tokens", tiled_mlp_tile_tokens), ("tiled_loss_tile_tokens", tiled_loss_tile_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
    ckpt = GradientCheckpointing(checkpoint_policy, save_attention_layers)
    loss = TiledLoss(tiled_loss_tile_tokens, tiled_loss_impl)
    always: list[MemoryTrick] = []
    sp_defaults: list[MemoryTrick] = []
    if gradient_checkpointing or (gradient_checkpointing is None and checkpoint_policy != "full"):
        always.append(ckpt)
    elif gradient_checkpointing is None:
        sp_defaults.append(ckpt)
    if tiled_loss:
        always.append(loss)
    elif tiled_loss is None:
        sp_defaults.append(loss)
    switched = [
        (tiled_mlp, TiledMLP, lambda: TiledMLP(tiled_mlp_tile_tokens)),
        (memory_efficient_rmsnorm, MemoryEfficientRMSNorm, lambda: MemoryEfficientRMSNorm(memory_efficient_impl)),
        (memory_efficient_swiglu, MemoryEfficientSwiGLU, lambda: MemoryEfficientSwiGLU(memory_efficient_impl)),
        (tiled_attention_backward, TiledAttentionBackward, lambda: TiledAttentionBackward(tiled_attention_tile_tokens)),
        (activation_checkpoint_cpu_offload, ActivationOffload,
         lambda: ActivationOffload(keep_layers=activation_checkpoint_cpu_offload_keep_layers)),
    ]
    always += [make() for on, _, make in switched if on]
    explicit = list(memory or [])
    ordered(explicit)  # type check, one per kind
    flagged = {
        GradientCheckpointing: gradient_checkpointing is not None or checkpoint_policy != "full" or save_attention_layers is not None,
        TiledLoss: tiled_loss is not None or tiled_loss_tile_tokens is not None or tiled_loss_impl != "auto",
        **{cls: bool(on) for on, cls, _ in switched},
    }
    for trick in explicit:
        if flagged.get(type(trick)):
            raise ValueError(
                f"{type(trick).__name__} is given in memory=[...] and by the strategy's flat flags; use one of the two."
            )
    kinds = {type(t) for t in explicit}
    if gradient_checkpointing is False:
        kinds.add(GradientCheckpointing)
    if tiled_loss is False:
        kinds.add(TiledLoss)
    return MemoryPlan(
        tricks=[t for t in always if type(t) not in kinds] + explicit,
        sp_defaults=[t for t in sp_defaults if type(t) not in kinds],
    )


__all__ = ["MemoryPlan", "TRICKS", "tricks_from_flags"]
