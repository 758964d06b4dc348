"""The memory tricks ("Ulysses Plus"): one :class:`MemoryTrick` class per trick, in its own module, registered in
:data:`lightning_ulysses.memory.plan.TRICKS`; :func:`apply_tricks` applies a list in plan order.

Also here: the CUDA allocator default (:mod:`.allocator`) and the ZeRO-3 settings for long sequences
(:mod:`.zero_config`).
"""

from lightning_ulysses.memory.activation_checkpoint import GradientCheckpointing
from lightning_ulysses.memory.offload import ActivationOffload
from lightning_ulysses.memory.plan import TRICKS, MemoryPlan, tricks_from_flags
from lightning_ulysses.memory.rmsnorm import MemoryEfficientRMSNorm
from lightning_ulysses.memory.swiglu import MemoryEfficientSwiGLU
from lightning_ulysses.memory.tiled_attention import TiledAttentionBackward
from lightning_ulysses.memory.tiled_loss import TiledLoss
from lightning_ulysses.memory.tiled_mlp import TiledMLP
from lightning_ulysses.memory.trick import MemoryTrick, apply_tricks, remove_tricks, trainer_tricks

__all__ = [
    "ActivationOffload",
    "GradientCheckpointing",
    "MemoryEfficientRMSNorm",
    "MemoryEfficientSwiGLU",
    "MemoryPlan",
    "MemoryTrick",
    "TRICKS",
    "TiledAttentionBackward",
    "TiledLoss",
    "TiledMLP",
    "apply_tricks",
    "remove_tricks",
    "trainer_tricks",
    "tricks_from_flags",
]
