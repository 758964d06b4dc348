"""Throughput accounting for long-sequence training: tokens/s counted once per sequence, model and
hardware TFLOPS per GPU, MFU, peak memory.

Formulas (per optimizer step, summed over the step's sequences of full length ``S``):

* model FLOPs = ``6 * N_mm * S + 6 * L * S^2 * H`` -- dense matmuls (``N_mm`` = parameters without the
  input embedding, whose lookup is no matmul) plus causal attention forward+backward (``QK^T`` and
  ``PV``: ``4 * S^2 * H`` per layer forward, halved by causality, times 3 for forward+backward); for packed rows
  ``S^2`` is summed over the segments (:func:`sum_sq_len`), the attention work really done;
* hardware FLOPs adds what full activation checkpointing recomputes (one more forward:
  ``2 * N_mm * S + 2 * L * S^2 * H``) when gradient checkpointing is on, or only its dense part
  (``2 * N_mm * S``) under the ``save_attention`` policy (plus the attention of the layers that do not
  keep their outputs, with ``save_attention_layers``);
* MFU = model FLOPs/s per GPU / the chip's bf16 dense peak (Lightning's ``get_available_flops``, or
  ``peak_tflops`` when given, e.g. a measured matmul ceiling).

Under sequence parallelism each rank holds ``1/sp`` of every sequence: the full length is
``local length * sp`` and every token is counted exactly once (sum of the shards over the world).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class ModelDims:
    n_matmul_params: int  # parameters excluding the input embedding
    layers: int
    hidden: int  # attention width: heads * head_dim

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelDims":
        """The language model's dimensions (a vision-language model's tower is :class:`VisionDims`)."""
        from lightning_ulysses.models.multimodal import vlm_family

        cfg = model.config.get_text_config()
        family = vlm_family(model)
        tower = {id(p) for p in family.tower(model).parameters()} if family is not None else set()
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if id(p) not in tower)
        emb = model.get_input_embeddings()
        emb_n = sum(getattr(p, "ds_numel", p.numel()) for p in emb.parameters()) if emb is not None else 0
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(total - emb_n, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim)


@dataclass(frozen=True)
class VisionDims:
    """A vision-language model's tower (encoder + projector): parameters, depth, width, and whether its encoder
    trains; for memory planning also its MLP width, the patches behind one language-model token, one patch's input
    bytes, and the projector's parameters and whether it trains (it does unless ``freeze_projector``)."""

    n_params: int
    layers: int
    hidden: int
    trains: bool
    intermediate: int = 0
    patches_per_token: int = 1  # Qwen-VL merges spatial_merge_size^2 patches into one token; LLaVA: one each
    patch_bytes: int = 0  # one patch's pixels as the batch carries them (fp32)
    projector_params: int = 0
    projector_trains: bool = False

    @classmethod
    def of(cls, model: torch.nn.Module) -> Optional["VisionDims"]:
        from lightning_ulysses.models.multimodal import vlm_family

        family = vlm_family(model)
        if family is None:
            return None
        numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 partitions report 0)
        projector = list(family.projector(model).parameters())
        ids = {id(p) for p in projector}
        encoder = [p for p in family.tower(model).parameters() if id(p) not in ids]
        return cls.from_config(model.config, sum(map(numel, encoder)) + sum(map(numel, projector)),
                               any(p.requires_grad for p in encoder), sum(map(numel, projector)),
                               any(p.requires_grad for p in projector))

    @classmethod
    def from_config(cls, config: Any, n_params: int, trains: bool = True, projector_params: int = 0,
                    projector_trains: bool = True) -> "VisionDims":
        """From a vision-language ``config`` (its ``vision_config``: Qwen-VL's ``depth`` / ``embed_dim`` /
        ``mlp_ratio`` or ``hidden_size`` / ``intermediate_size``, CLIP/SigLIP's ``num_hidden_layers``)."""
        vc = config.vision_config
        hidden = getattr(vc, "embed_dim", None) or vc.hidden_size
        intermediate = getattr(vc, "intermediate_size", None) or int(hidden * getattr(vc, "mlp_ratio", 4))
        channels = getattr(vc, "in_channels", None) or getattr(vc, "num_channels", None) or 3
        patch = 4 * channels * (getattr(vc, "temporal_patch_size", None) or 1) * vc.patch_size**2
        return cls(n_params, getattr(vc, "depth", None) or vc.num_hidden_layers, hidden, trains, intermediate,
                   (getattr(vc, "spatial_merge_size", None) or 1) ** 2, patch, projector_params, projector_trains)


def vision_flops(dims: VisionDims, patches: float, sum_sq_patches: float, recompute: bool = False) -> float:
    """Tower FLOPs of one step: ``patches`` encoded, ``sum_sq_patches`` the sum over units (what one attention spans:
    an image, a video's frame group) of their patch count squared; bidirectional attention. A trained encoder costs
    forward + backward (3x the forward; + a recomputed forward with ``recompute``, its blocks checkpointed), a frozen
    one its forward; the projector likewise on its own (never recomputed), once per merged token."""
    encoder = 2.0 * (dims.n_params - dims.projector_params) * patches + 4.0 * dims.layers * dims.hidden * sum_sq_patches
    projector = 2.0 * dims.projector_params * patches / dims.patches_per_token  # it runs on the merged tokens
    passes = (4.0 if recompute else 3.0) if dims.trains else 1.0
    return passes * encoder + (3.0 if dims.projector_trains else 1.0) * projector


def sum_sq_len(rows: int, length: int, segment_bounds: Optional[list] = None) -> float:
    """``sum S^2`` of the attention term: per sequence, or per packed segment when ``segment_bounds`` (per row the
    ``(start, end)`` of each segment, :class:`~lightning_ulysses.parallel.step_context.StepContext`) are known -- a
    row of 8 documents does 1/8 of the attention work of one document of the same length."""
    if segment_bounds:
        return float(sum((end - start) ** 2 for row in segment_bounds for start, end in row))
    return float(rows * length * length)


def model_flops(dims: ModelDims, tokens: float, sum_sq_len: float) -> float:
    """Model FLOPs of one forward+backward; ``tokens = sum S``, ``sum_sq_len = sum S^2`` over sequences."""
    return 6.0 * dims.n_matmul_params * tokens + 6.0 * dims.layers * dims.hidden * sum_sq_len


def recompute_flops(dims: ModelDims, tokens: float, sum_sq_len: float, attention: float = 1.0) -> float:
    """Extra FLOPs of one recomputed forward: full checkpointing (``attention=1``), or with the attention of
    only that share of the layers recomputed (``save_attention``: 0, or ``1 - kept/layers`` when only some
    layers keep their attention outputs)."""
    dense = 2.0 * dims.n_matmul_params * tokens
    return dense + 2.0 * dims.layers * dims.hidden * sum_sq_len * float(attention)


# bf16 dense peaks (spec sheet, TFLOP/s) of chips Lightning's table lacks. The H200 has the H100 SXM's tensor
# cores (more and faster memory only); its measured 8192^3 bf16 matmul ceiling is 786 (docs/benchmarks.md), so
# pass ``peak_tflops=786`` for MFU against what the chip really sustains.
_EXTRA_BF16_TFLOPS = {"nvidia h200": 989.4}  # SXM; the lower-power H200 NVL is left to ``peak_tflops``


def chip_bf16_tflops(name: str) -> Optional[float]:
    """Spec-sheet bf16 dense peak for a device name Lightning does not know (``"NVIDIA H200"`` -> 989.4)."""
    return _EXTRA_BF16_TFLOPS.get(name.strip().lower())


def peak_flops_per_gpu(device: torch.device, peak_tflops: Optional[float] = None) -> Optional[float]:
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    extra = chip_bf16_tflops(torch.cuda.get_device_name(device))
    if extra is not None:  # before Lightning's lookup, which warns for chips it lacks
        return extra * 1e12
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(device, torch.bfloat16)
    return float(flops) if flops else None


__all__ = ["ModelDims", "VisionDims", "chip_bf16_tflops", "model_flops", "peak_flops_per_gpu", "recompute_flops",
           "vision_flops"]
