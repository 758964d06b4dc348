"""Lightning callbacks shipped with lightning_ulysses: ``PrintLoss``, ``SequenceThroughput``, ``HFExport``,
``PredictionWriter``.

The memory tricks are callbacks too (each :class:`~lightning_ulysses.memory.MemoryTrick` is one); they live in
:mod:`lightning_ulysses.memory` and are re-exported here, where projects look for callbacks.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Optional

import torch

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_ulysses.models.adapters import adapter_config, is_peft_model
from lightning_ulysses.models.inspect import find_hf_model
from lightning_ulysses.memory import (
    ActivationOffload,
    GradientCheckpointing,
    MemoryEfficientRMSNorm,
    MemoryEfficientSwiGLU,
    TiledAttentionBackward,
    TiledLoss,
    TiledMLP,
)


class PrintLoss(Callback):
    """Print the (DP-mean) ``train_loss`` every ``every_n_steps`` optimizer steps, and ``val_loss`` after each
    validation, on rank 0.

    A plain-text trace that survives CI logs and non-interactive shells, where progress bars do not.
    """

    def __init__(self, every_n_steps: int = 10, metric: str = "train_loss") -> None:
        self.every_n_steps = every_n_steps
        self.metric = metric
        self._printed_step = -1

    @override
    @rank_zero_only
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._printed_step:  # inside an accumulation window the step has not advanced yet
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is not None and (step % self.every_n_steps == 0 or step == 1 or step == trainer.max_steps):
            self._printed_step = step
            print(f"step {step:>5d}  {self.metric} {float(value):.4f}", flush=True)

    @override
    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val_loss")
        if value is not None:
            print(f"step {trainer.global_step:>5d}  val_loss {float(value):.4f}", flush=True)


class HFExport(Callback):
    """Write the model as a Hugging Face directory (``AutoModelForCausalLM.from_pretrained(dir)`` loads it) every
    ``every_n_train_steps`` optimizer steps and at the end of fit, while training runs: no DeepSpeed checkpoint and
    no ``lightning-ulysses export`` step in between.

    Directories: ``dirpath/step=<N>`` and ``dirpath/final``; each is written as ``<name>.partial`` and renamed when
    complete. Weights are gathered one parameter at a time onto rank 0's host memory (ZeRO-3 partitions included;
    no rank holds a second copy on its accelerator) in the dtype the model trains in (``dtype`` casts), sharded
    above ``max_shard_size``. A LoRA/PEFT model writes its adapters, or with ``merge`` the merged model. The
    tokenizer is saved alongside when ``tokenizer`` names one, or the model was loaded from a path or hub name.

    Args:
        dirpath: where the directories go.
        every_n_train_steps: export every this many optimizer steps (``None``: only at the end).
        at_end: also export when fit ends (``final``).
        merge, tokenizer, max_shard_size, dtype: as ``lightning-ulysses export``.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: Optional[int] = None,
        at_end: bool = True,
        merge: bool = False,
        tokenizer: Optional[str] = None,
        max_shard_size: str = "5GB",
        dtype: Optional[str] = None,
    ) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be a positive number of steps or None, got {every_n_train_steps}")
        if dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or None (the training dtype), got {dtype!r}")
        self.dirpath, self.every_n_train_steps, self.at_end = dirpath, every_n_train_steps, at_end
        self.merge, self.tokenizer, self.max_shard_size, self.dtype = merge, tokenizer, max_shard_size, dtype
        self._last_step = -1
        self.written: list[str] = []

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 and step != self._last_step:
            self._last_step = step  # within an accumulation window the step has not advanced yet
            self.export(trainer, pl_module, f"step={step}")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_end:
            self.export(trainer, pl_module, "final")

    def export(self, trainer: Trainer, pl_module: LightningModule, name: str) -> str:
        """Write ``dirpath/name`` now (every rank must call it); returns the directory."""
        from lightning_ulysses.checkpoint.files import publish, staging_path
        from lightning_ulysses.checkpoint.weights import gather_weights
        from lightning_ulysses.checkpoint.hf_model import write_hf

        model = _exported_model(pl_module)
        weights = gather_weights(model, getattr(torch, self.dtype) if self.dtype else None)
        out = str(Path(self.dirpath) / name)
        if trainer.is_global_zero:
            spec = getattr(pl_module, "hparams", {}).get("model")
            base = spec if isinstance(spec, str) else getattr(model.config, "name_or_path", None) or None
            adapters = copy.deepcopy(adapter_config(model)) if is_peft_model(model) else None
            staging = staging_path(out)
            write_hf(weights, model.config, staging, adapters=adapters, base=base, tokenizer=self.tokenizer or base,
                     tokenizer_required=self.tokenizer is not None, max_shard_size=self.max_shard_size, merge=self.merge)
            publish(staging, out)
        trainer.strategy.barrier("HFExport")
        self.written.append(out)
        return out


class PredictionWriter(BasePredictionWriter):
    """Save what ``trainer.predict`` returns to files, so that ``lightning-ulysses predict`` leaves something behind
    (Lightning's CLI keeps no predictions). What a batch returns is set by ``CausalLMModule(predict_output=...)``:
    whole sequences, gathered over the SP group, the strategy's padding removed.

    Every rank of an SP group holds the same outputs, so only the group's first rank writes, one set of files per DP
    group (``dp<r>``: the DP group's rank; its batches are the rows the distributed sampler gave it, and
    ``batch_indices`` says which rows of the dataset they are). Tensors are moved to the CPU and written with
    ``torch.save``:

    * ``write_interval="batch"`` (default): ``dirpath/dp<r>_batch<i>.pt`` per batch (``_dl<d>`` after ``dp<r>`` for a
      second predict loader), ``{"prediction": ..., "batch_indices": [...], "dataloader_idx": d}``;
    * ``"epoch"``: ``dirpath/predictions_dp<r>.pt`` at the end, ``{"predictions": [...], "batch_indices": [...]}``
      (lists per batch; a list per loader with several loaders).

    Args:
        dirpath: the directory (created).
        write_interval: ``"batch"`` or ``"epoch"``.
    """

    def __init__(self, dirpath: str = "predictions", write_interval: str = "batch") -> None:
        if write_interval not in ("batch", "epoch"):
            raise ValueError(f"write_interval must be 'batch' or 'epoch', got {write_interval!r}.")
        super().__init__(write_interval)
        self.dirpath = dirpath
        self.written: list[str] = []

    def _dp_rank(self, trainer: Trainer) -> Optional[int]:
        """This rank's DP group, or ``None`` where another rank of its SP group writes."""
        layout = getattr(trainer.strategy, "layout", None)
        if layout is None:  # another strategy: every rank reads its own rows
            return trainer.global_rank
        rank = trainer.global_rank
        return layout.dp_rank(rank) if layout.sp_rank(rank) == 0 else None

    def _save(self, obj: Any, name: str) -> None:
        from lightning.fabric.utilities.apply_func import move_data_to_device

        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        path = str(Path(self.dirpath) / name)
        torch.save(move_data_to_device(obj, "cpu"), path)
        self.written.append(path)

    @override
    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Optional[Any], batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        dp = self._dp_rank(trainer)
        if dp is not None:
            loader = f"_dl{dataloader_idx}" if dataloader_idx else ""
            self._save({"prediction": prediction, "batch_indices": list(batch_indices or []),
                        "dataloader_idx": dataloader_idx}, f"dp{dp}{loader}_batch{batch_idx:06d}.pt")

    @override
    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        dp = self._dp_rank(trainer)
        if dp is not None:
            # Lightning flattens the predictions of a single loader but not their indices: match them
            if len(trainer.num_predict_batches) == 1 and len(batch_indices) == 1:
                batch_indices = batch_indices[0]
            self._save({"predictions": predictions, "batch_indices": batch_indices}, f"predictions_dp{dp}.pt")


def _exported_model(pl_module: LightningModule) -> Any:
    """The module's Hugging Face model (its ``model`` attribute when that is one, PEFT-wrapped or not)."""
    from transformers import PreTrainedModel

    model = getattr(pl_module, "model", None)
    if model is not None and (isinstance(model, PreTrainedModel) or is_peft_model(model)):
        return model
    found = find_hf_model(pl_module)
    if found is None:
        raise ValueError("HFExport found no Hugging Face model in the LightningModule (a transformers PreTrainedModel "
                         "or PEFT model, e.g. as its `model` attribute).")
    return found


class SequenceThroughput(Callback):
    """Logs tokens/s, model and hardware TFLOPS per GPU, MFU and peak GPU memory every step, and
    prints a summary at the end of training (formulas: :mod:`lightning_ulysses.models.flops`).

    Tokens are counted once per sequence (not once per SP rank) and include padding. Works with any
    strategy; under ``UlyssesDeepSpeedStrategy`` the sequence length is the shard length times sp. A vision-language
    model's tower is counted apart (``throughput/vision_patches_per_sec``, ``throughput/vision_tflops_per_gpu``:
    :func:`~lightning_ulysses.models.flops.vision_flops`); tokens, model TFLOPS and MFU are the language model's.

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
        self._vision: Any = None
        self._model: Any = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_ulysses.models.flops import ModelDims, VisionDims, peak_flops_per_gpu

        model = find_hf_model(pl_module)
        self._dims = ModelDims.of(model) if model is not None else None
        self._vision = VisionDims.of(model) if model is not None else None
        self._peak_flops = peak_flops_per_gpu(pl_module.device, self.peak_tflops)  # once, not every step
        self.history = []

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after every callback's on_fit_start: the memory tricks are applied by now
        self._model = find_hf_model(pl_module)

    def _vision_work(self, batch: Any) -> tuple[float, float]:
        """Patches the tower encodes in this batch and the sum over its units of their patch count squared."""
        from lightning_ulysses.models.multimodal import vlm_family

        if not isinstance(batch, dict):
            return 0.0, 0.0
        units = vlm_family(self._model).units(self._model, batch)
        return float(sum(u.patches for u in units)), float(sum(u.patches**2 for u in units))

    def _sync(self, device: Any) -> None:
        if getattr(device, "type", None) == "cuda":
            torch.cuda.synchronize(device)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module.device)
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        from lightning_ulysses.memory import TRICKS
        from lightning_ulysses.models.flops import model_flops, sum_sq_len
        from lightning_ulysses.parallel.step_context import current_step_context

        self._sync(pl_module.device)
        dt = time.perf_counter() - self._t0
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        layout = getattr(trainer.strategy, "layout", None)
        sp = layout.sp if layout is not None else 1
        b, s = ids.shape[0], ids.shape[1] * sp  # full sequence length
        ctx = current_step_context()  # packed rows: attention is per segment
        bounds = ctx.segment_bounds if ctx is not None and ctx.training else None
        patches, sq_patches = self._vision_work(batch) if self._vision is not None else (0.0, 0.0)
        # [sequences, sum S, sum S^2, vision patches, sum of units' patches^2] over the world; every SP rank of a
        # group reports the same sequences (and the same images: the batch's vision inputs are whole on each)
        stats = torch.tensor([float(b), float(b * s), sum_sq_len(b, s, bounds), patches, sq_patches],
                             device=pl_module.device, dtype=torch.float64)
        stats = trainer.strategy.reduce(stats, reduce_op="sum") / sp
        world = trainer.world_size
        _, tokens, sq, patches, sq_patches = (float(x) for x in stats)
        flops = model_flops(self._dims, tokens, sq) if self._dims else 0.0
        recompute = 0.0
        if self._dims and self._model is not None:  # what each trick, as applied, recomputes
            recompute = sum(trick.recomputed_flops(self._model, self._dims, tokens, sq) for trick in TRICKS)
        hw = flops + recompute
        metrics = {
            "throughput/tokens_per_sec": tokens / dt,
            "throughput/model_tflops_per_gpu": flops / dt / world / 1e12,
            "throughput/hw_tflops_per_gpu": hw / dt / world / 1e12,
            "throughput/step_s": dt,
        }
        if self._vision is not None:  # the tower apart: model TFLOPS and MFU stay the language model's
            from lightning_ulysses.models.flops import vision_flops

            metrics["throughput/vision_patches_per_sec"] = patches / dt
            metrics["throughput/vision_tflops_per_gpu"] = vision_flops(self._vision, patches, sq_patches) / dt / world / 1e12
        if self._peak_flops:
            metrics["throughput/mfu"] = flops / dt / world / self._peak_flops
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            mem = torch.tensor(torch.cuda.max_memory_allocated(pl_module.device) / 2**30, device=pl_module.device)
            metrics["memory/peak_allocated_gib"] = float(trainer.strategy.reduce(mem, reduce_op="max"))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self.history.append(metrics)

    @override
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
        if "throughput/vision_patches_per_sec" in med:
            parts.append(f"vision {med['throughput/vision_patches_per_sec']:,.0f} patches/s, "
                         f"{med['throughput/vision_tflops_per_gpu']:.3g} TFLOPS/GPU")
        if "memory/peak_allocated_gib" in med:
            parts.append(f"peak {max(m['memory/peak_allocated_gib'] for m in steady):.2f} GiB")
        print(f"throughput (median of {len(steady)} steps): " + ", ".join(parts), flush=True)


__all__ = [
    "ActivationOffload",
    "GradientCheckpointing",
    "MemoryEfficientRMSNorm",
    "MemoryEfficientSwiGLU",
    "PrintLoss",
    "HFExport",
    "PredictionWriter",
    "SequenceThroughput",
    "TiledAttentionBackward",
    "TiledLoss",
    "TiledMLP",
]
