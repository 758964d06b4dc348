"""Lightning callbacks shipped with lightning_ulysses."""

from __future__ import annotations

import time
from typing import Any, Optional

import torch

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class PrintLoss(Callback):
    """Print the (DP-mean) ``train_loss`` every ``every_n_steps`` optimizer steps, and ``val_loss`` after each
    validation, on rank 0.

    A plain-text trace that survives CI logs and non-interactive shells, where progress bars do not.
    """

    def __init__(self, every_n_steps: int = 10, metric: str = "train_loss") -> None:
        self.every_n_steps = every_n_steps
        self.metric = metric
        self._printed_step = -1

    @rank_zero_only
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._printed_step:  # inside an accumulation window the step has not advanced yet
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is not None and (step % self.every_n_steps == 0 or step == 1 or step == trainer.max_steps):
            self._printed_step = step
            print(f"step {step:>5d}  {self.metric} {float(value):.4f}", flush=True)

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val_loss")
        if value is not None:
            print(f"step {trainer.global_step:>5d}  val_loss {float(value):.4f}", flush=True)


class _HFModelTransform(Callback):
    """Applies a transformation to the Hugging Face model inside the LightningModule at the start of
    every stage (idempotent), so it also reaches models built in ``configure_model``."""

    def apply(self, model: Any, trainer: Trainer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_ulysses.model_utils import find_hf_model

        model = find_hf_model(pl_module)
        if model is None:
            raise ValueError(
                f"{type(self).__name__} needs a transformers PreTrainedModel inside the LightningModule; none was found."
            )
        self.apply(model, trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)


class GradientCheckpointing(_HFModelTransform):
    """Non-reentrant gradient checkpointing of every decoder layer (HF's own mechanism).

    Args:
        policy: ``"full"`` recomputes the whole layer in backward; ``"save_attention"`` keeps the
            attention kernel's output and log-sum-exp from the forward (selective checkpointing), so
            attention is not recomputed: faster at long sequences for one attention output per layer.
        save_attention_layers: with ``"save_attention"``, keep the attention outputs of the first this many
            decoder layers only (the rest recompute attention): a dial between the speed of keeping them
            all and the memory of keeping none. ``None``: every layer.
    """

    def __init__(self, policy: str = "full", save_attention_layers: Optional[int] = None) -> None:
        from lightning_ulysses.model_utils import check_save_attention_layers, checkpoint_kwargs

        checkpoint_kwargs(policy)  # validates the name at construction
        check_save_attention_layers(policy, save_attention_layers)
        self.policy = policy
        self.save_attention_layers = save_attention_layers

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.model_utils import enable_gradient_checkpointing

        enable_gradient_checkpointing(model, self.policy, self.save_attention_layers)


class TiledLoss(_HFModelTransform):
    """Tiled logits + cross-entropy (:mod:`lightning_ulysses.tiled_loss`): ``model(..., labels=...)``
    returns the loss without ever materialising the ``[tokens, vocab]`` logits (``logits`` is None).

    Args:
        tile_tokens: tokens per tile; default keeps one fp32 logits tile at ~1 GiB.
        impl: ``"auto"`` (Liger's fused kernel when liger-kernel is installed and the model is on CUDA,
            else the torch implementation), ``"torch"`` or ``"liger"``.
    """

    def __init__(self, tile_tokens: Optional[int] = None, impl: str = "auto") -> None:
        self.tile_tokens = tile_tokens
        self.impl = impl

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.tiled_loss import enable_tiled_loss

        enable_tiled_loss(model, self.tile_tokens, self.impl)


class ActivationOffload(_HFModelTransform):
    """Checkpointed layer inputs wait for backward in CPU memory (:mod:`lightning_ulysses.offload`).

    Turns gradient checkpointing on if it is off (there is nothing to offload without it); a policy
    already chosen (``save_attention``) is kept.

    Args:
        min_bytes: smaller layer inputs stay on the GPU.
        keep_layers: the first this many layer inputs stay on the GPU (host RAM is shared by a node's ranks
            and can end the sequence before GPU memory does; each kept input moves ``2 * hidden`` bytes per
            local token from host to GPU memory).
    """

    def __init__(self, min_bytes: int = 0, keep_layers: int = 0) -> None:
        from lightning_ulysses.offload import check_keep_layers

        check_keep_layers(keep_layers)
        self.min_bytes = min_bytes
        self.keep_layers = keep_layers

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.model_utils import enable_gradient_checkpointing
        from lightning_ulysses.offload import activation_offloader, enable_activation_offload

        enable_gradient_checkpointing(model)
        if activation_offloader(model) is None:
            enable_activation_offload(model, self.min_bytes, self.keep_layers)


class TiledMLP(_HFModelTransform):
    """Each decoder layer's MLP computed in token tiles (:mod:`lightning_ulysses.tiled_mlp`).

    Args:
        tile_tokens: tokens per tile; default: the model's hidden size.
    """

    def __init__(self, tile_tokens: Optional[int] = None) -> None:
        self.tile_tokens = tile_tokens

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.tiled_mlp import enable_tiled_mlp

        enable_tiled_mlp(model, self.tile_tokens)


class MemoryEfficientRMSNorm(_HFModelTransform):
    """Llama-style RMSNorms that keep their input, not an fp32 copy, for backward
    (:mod:`lightning_ulysses.rmsnorm`).

    Args:
        impl: ``"auto"`` (Liger's kernel on CUDA when liger-kernel is installed, else torch),
            ``"torch"`` or ``"liger"``.
    """

    def __init__(self, impl: str = "auto") -> None:
        from lightning_ulysses.kernels import check_impl

        check_impl(impl, "memory-efficient RMSNorm")
        self.impl = impl

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.rmsnorm import enable_memory_efficient_rmsnorm

        enable_memory_efficient_rmsnorm(model, self.impl)


class MemoryEfficientSwiGLU(_HFModelTransform):
    """SiLU-gated MLPs that keep ``gate`` and ``up`` only, recomputing ``silu(gate)`` in backward
    (:mod:`lightning_ulysses.swiglu`); combines with :class:`TiledMLP`.

    Args:
        impl: ``"auto"`` (Liger's fused kernel on CUDA when liger-kernel is installed, else torch),
            ``"torch"`` or ``"liger"``.
    """

    def __init__(self, impl: str = "auto") -> None:
        from lightning_ulysses.kernels import check_impl

        check_impl(impl, "memory-efficient SwiGLU")
        self.impl = impl

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.swiglu import enable_memory_efficient_swiglu

        enable_memory_efficient_swiglu(model, self.impl)


class TiledAttentionBackward(_HFModelTransform):
    """Attention whose backward runs on query x key tiles with the forward's output and log-sum-exp
    (:mod:`lightning_ulysses.tiled_attention`): bounds the attention kernel's backward workspace, the
    largest transient of a long-sequence step. Exact; ``sdpa`` models only.

    Args:
        tile_tokens: queries (and keys) per tile; default 16384.
        backend: block kernel: ``"auto"`` (cuDNN on CUDA, the flash CPU op on CPU), ``"cudnn"``,
            ``"flash"``, ``"cpu"``, ``"math"``.
    """

    def __init__(self, tile_tokens: Optional[int] = None, backend: str = "auto") -> None:
        from lightning_ulysses.tiled_attention import TiledAttentionCore

        TiledAttentionCore(tile_tokens or 1, backend)  # validates both at construction
        self.tile_tokens = tile_tokens
        self.backend = backend

    def apply(self, model: Any, trainer: Trainer) -> None:
        from lightning_ulysses.tiled_attention import enable_tiled_attention

        enable_tiled_attention(model, self.tile_tokens, self.backend)


class SequenceThroughput(Callback):
    """Logs tokens/s, model and hardware TFLOPS per GPU, MFU and peak GPU memory every step, and
    prints a summary at the end of training (formulas: :mod:`lightning_ulysses.throughput`).

    Tokens are counted once per sequence (not once per SP rank) and include padding. Works with any
    strategy; under ``UlyssesDeepSpeedStrategy`` the sequence length is the shard length times sp.

    Args:
        peak_tflops: bf16 peak per GPU for MFU; default: Lightning's table for the chip (CUDA only).
        warmup_steps: steps left out of the summary (compilation, allocator warm-up).
    """

    def __init__(self, peak_tflops: Optional[float] = None, warmup_steps: int = 1) -> None:
        self.peak_tflops = peak_tflops
        self.warmup_steps = warmup_steps
        self.history: list[dict[str, float]] = []
        self._t0 = 0.0
        self._dims: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_ulysses.model_utils import find_hf_model
        from lightning_ulysses.throughput import ModelDims, peak_flops_per_gpu

        model = find_hf_model(pl_module)
        self._dims = ModelDims.of(model) if model is not None else None
        self._peak_flops = peak_flops_per_gpu(pl_module.device, self.peak_tflops)  # once, not every step
        self.history = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after every callback's on_fit_start: the checkpointing callback may have changed the policy
        from lightning_ulysses.model_utils import checkpoint_policy_of, find_hf_model, saved_attention_fraction

        model = find_hf_model(pl_module)
        self._checkpointing = checkpoint_policy_of(model) if model is not None else None
        self._recomputed_attention = 1.0 - saved_attention_fraction(model) if model is not None else 1.0

    def _sync(self, device: Any) -> None:
        if getattr(device, "type", None) == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        from lightning_ulysses.throughput import model_flops, recompute_flops

        self._sync(pl_module.device)
        dt = time.perf_counter() - self._t0
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        layout = getattr(trainer.strategy, "layout", None)
        sp = layout.sp if layout is not None else 1
        b, s = ids.shape[0], ids.shape[1] * sp  # full sequence length
        # [sequences, sum S, sum S^2] over the world; every SP rank of a group reports the same sequences
        stats = torch.tensor([float(b), float(b * s), float(b * s * s)], device=pl_module.device, dtype=torch.float64)
        stats = trainer.strategy.reduce(stats, reduce_op="sum") / sp
        world = trainer.world_size
        _, tokens, sq = (float(x) for x in stats)
        flops = model_flops(self._dims, tokens, sq) if self._dims else 0.0
        recompute = 0.0
        if self._dims and self._checkpointing:
            recompute = recompute_flops(self._dims, tokens, sq, attention=self._recomputed_attention)
        hw = flops + recompute
        metrics = {
            "throughput/tokens_per_sec": tokens / dt,
            "throughput/model_tflops_per_gpu": flops / dt / world / 1e12,
            "throughput/hw_tflops_per_gpu": hw / dt / world / 1e12,
            "throughput/step_s": dt,
        }
        if self._peak_flops:
            metrics["throughput/mfu"] = flops / dt / world / self._peak_flops
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            mem = torch.tensor(torch.cuda.max_memory_allocated(pl_module.device) / 2**30, device=pl_module.device)
            metrics["memory/peak_allocated_gib"] = float(trainer.strategy.reduce(mem, reduce_op="max"))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self.history.append(metrics)

    @rank_zero_only
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        steady = self.history[self.warmup_steps :] or self.history
        if not steady:
            return
        med = {k: sorted(m[k] for m in steady)[len(steady) // 2] for k in steady[0]}
        # three significant digits: GPU runs print e.g. 372, a CPU smoke test 0.00412 (not a misleading 0.0)
        parts = [f"{med['throughput/tokens_per_sec']:,.0f} tokens/s", f"{med['throughput/model_tflops_per_gpu']:.3g} model TFLOPS/GPU",
                 f"{med['throughput/hw_tflops_per_gpu']:.3g} hw TFLOPS/GPU"]
        if "throughput/mfu" in med:
            parts.append(f"MFU {100 * med['throughput/mfu']:.1f}%")
        if "memory/peak_allocated_gib" in med:
            parts.append(f"peak {max(m['memory/peak_allocated_gib'] for m in steady):.2f} GiB")
        print(f"throughput (median of {len(steady)} steps): " + ", ".join(parts), flush=True)
