"""Private APIs of our dependencies, each wrapped once, per dependency, with the versions it was checked against.

* :mod:`.lightning` -- Lightning 2.5-2.6 (the accumulation boundary, DeepSpeedStrategy's private hooks we override)
* :mod:`.deepspeed` -- DeepSpeed 0.19 (ZeRO-3 parameter attributes, the ``zero.Init`` context)
* :mod:`.transformers` -- transformers 5.x (the attention-function registry, attention implementation, the HF
  DeepSpeed integration, checkpointed-layer internals, the loss helper)
* :mod:`.torch` -- torch 2.11-2.13 (functional collectives, dispatch modes)

``tests/test_compat.py`` exercises every wrapper against the installed versions, so a dependency that changes one
of these fails there, naming the call, instead of a training run going wrong somewhere else. Nothing outside this
package touches another library's private names, except the attention block kernels
(:mod:`lightning_ulysses.kernels.attention`), whose purpose is to bind torch's private SDPA ops (the same test
checks those ops exist).
"""

from lightning_ulysses.compat.deepspeed import is_zero3_params, set_zero3_grads_ready, use_mpu, zero_init_paused
from lightning_ulysses.compat.lightning import lightning_step_boundary, trainer_of
from lightning_ulysses.compat.transformers import TransformersZero3

__all__ = ["TransformersZero3", "is_zero3_params", "lightning_step_boundary", "set_zero3_grads_ready", "trainer_of", "use_mpu",
           "zero_init_paused"]
