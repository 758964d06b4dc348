"""``memory="auto"``: predict each memory plan's GPU and host peaks and its step time, pick the fastest that fits.

Everything here is arithmetic on numbers known before the model is built: the model's config, the sequence length,
the layout, the ZeRO stage and optimizer, the GPU's memory and the node's host RAM. No GPU is needed
(``lightning-ulysses plan`` runs it anywhere).

What a rank holds at its memory peak (bytes; ``S_l`` = tokens this rank holds = rows x length / sp):

* static: weights, gradients and optimizer state as ZeRO partitions them (:func:`static_bytes`), plus the
  lm_head's gradient in flight (``V x H`` bf16) and, under ZeRO-3, one gathered decoder layer;
* per layer and token, what backward needs later: without checkpointing all of a layer's activations
  (``17.66 H + 8 I`` bytes, less ``8 H`` with the memory-efficient RMSNorm and ``2 I`` with the SwiGLU);
  with checkpointing the layer input (``2 H``, in host memory when offloaded) and, under ``save_attention``, the
  attention output and its log-sum-exp (``2 H + 4 heads``);
* per token, the working set of the one layer whose backward runs (:data:`COEFFICIENTS`): gradients in flight,
  the recomputed layer, and the larger of the attention backward's workspace (where attention is recomputed; smaller
  with ``tiled_attention_backward``) and the MLP's intermediates (``[S_l, I]`` tensors, gone with ``tiled_mlp``):
  the two backwards run one after the other;
* a vision-language model's tower (:func:`vision_bytes`): the batch's pixels and gathered features, what a trained
  projector saves, a trained encoder's checkpointed block inputs (all its activations without checkpointing), one
  block's working set on one tile of units, for this rank's share of the units (every token of a row counted as a vision token unless
  ``vision_tokens`` says fewer).

Host memory, per node: each rank's process (``host_base_gib``), its offloaded layer inputs (pinned) and, with
``offload_optimizer``, its optimizer partition and fp32 gradients; ``ranks_per_node`` ranks share it.

Step time: model FLOPs plus what the plan recomputes (:mod:`lightning_ulysses.models.flops`), times the measured
slowdown of the tiled MLP and the offload. The coefficients were measured at Llama-3.1-8B width (hidden 4096, MLP
14336) on one H200; other widths scale them by ``H`` and ``I`` as written above (assumed, not measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from lightning_ulysses.memory.candidates import CANDIDATES
from lightning_ulysses.models.flops import VisionDims

GiB = 2**30

# Where each number was measured: docs/benchmarks.md, "The memory stack" and "Memory slope with the tiled attention"
# (2026-11-22, one H200, 8B width, fwd+bwd, bytes per token of one layer's backward working set), and the
# "training contract" CLI runs (2026-12-01, static part of a ZeRO-3 AdamW step).
COEFFICIENTS: dict[str, float] = {
    # working set of one layer's backward, in units of H bytes per local token, every trick on: 72.4 KiB at H=4096
    # (docs/benchmarks.md 2026-11-22, "Memory slope with the tiled attention"; the shipped config's CLI runs of
    # 2026-12-01 give 67 KiB between 128K and 256K)
    "working_set_h": 18.1,
    # added without the tiled attention backward: 107.3 - 72.4 KiB at H=4096 (same table)
    "untiled_attention_h": 8.7,
    # added without the tiled MLP (memory-efficient SwiGLU on), in units of I bytes: 19.9 H at 8B width (about three
    # [S_l, I] bf16 intermediates). The attention's and the MLP's extras do not add: their backwards run one after the
    # other. Fitted at 4 layers x 262,144 tokens: save_attention+offload 78.46 GiB (H200) and full+offload 72.37 GiB
    # (H100) vs save_attention+offload+tiled_mlp 59.38 GiB (H100), 2026-12-05; the 2026-12-01 CLI runs at 128K
    # (save_attention+offload 53.83 vs shipped 39.84 GiB) agree within 5%
    "untiled_mlp_i": 5.7,
    # packed rows (positions restarting; attention one kernel call per sample): bytes per token per layer above one
    # document, in units of H, without checkpointing (with it, packed rows peak as one document does: 39.84 GiB both,
    # shipped config at 128K, 2026-12-01). Each sample's q/k/v slices are copied for its kernel call and the outputs
    # concatenated: 49.32 GiB for one DPO-style pair per row vs 48.32 for the same tokens as one document, 32,768 tokens
    # x 4 layers of 8B width, each in a fresh process (one H100, 2026-12-06): 2.0 H. (The 31 H measured on 2026-12-05
    # was the first fit's engine and optimizer state still alive in the second fit of the same process.)
    "packed_attention_h": 2.0,
    # a layer's saved activations without checkpointing: 17.66 H + 8 I bytes per token, less 8 H with the
    # memory-efficient norm and 2 I with the SwiGLU: 122.6 KiB at 8B width with both (one H100, 4 layers, 65,536 tokens,
    # no checkpointing: 66.13 GiB peak, 2026-12-05; DeepSpeed's ALST path without our norm/SwiGLU measured 210 KiB
    # on 4x H200, 2026-11-22, 11% above this formula)
    "layer_activations_h": 17.66,
    "layer_activations_i": 8.0,
    "rmsnorm_saves_h": 8.0,
    "swiglu_saves_i": 2.0,
    # without the tiled loss: every token's logits in bf16, their fp32 copy and its gradient (10 bytes x vocab;
    # measured 1.26 GiB per 1K tokens at vocab 128256). The tiled loss's one tile is freed before the layers' backward.
    "logits_v": 10.0,
    # ZeRO-3 bytes per *trained* decoder-layer parameter beyond weights + gradients + optimizer state (buffers that
    # grow with depth): fitted to 4 vs 8 fully trained layers of 8B width at 131,072 tokens (39.84 vs 57.72 GiB, one
    # H100, 2026-12-05); the 4-layer prediction is then 6% above its measurement, the 8-layer one exact. A LoRA
    # model's frozen layers have none: its 32-layer peaks (below) sit ~0.8 GiB above its bf16 weights at 0 tokens
    "zero3_layer_param_bytes": 2.92,
    # step time multipliers measured at 128K (tiled MLP: 1.08x; offload: 1.01x; tiled attention backward: 1.0x)
    "tiled_mlp_time": 1.08,
    "offload_time": 1.01,
    # CUDA context, allocator slack and DeepSpeed buffers above the tensors' sum at the peak (fits the CLI runs above)
    "gpu_overhead_gib": 0.5,
    # a vision tower block's activations per patch: units of its width E and its MLP width I (bytes): what autograd
    # saves in one Qwen2.5-VL-7B block on one tile (16,384 patches), 68,875 bytes per patch in bf16 (distinct storages;
    # windowed and full-attention blocks alike; ~39 MB more per call whatever its size), counted on CPU by
    # `benchmarks/vlm_throughput.py --block-saved-bytes` (2026-12-05); the GPU's attention kernel saves the same set
    # (q, k, v, output, log-sum-exp). Not yet checked against a GPU peak
    "vision_block_e": 32.4,
    "vision_block_i": 8.0,
    # of which a frozen tower's forward (no autograd) holds at once: assumed
    "vision_forward_share": 0.5,
    # what a trained projector saves for backward per language-model token: Qwen2.5-VL's merger 8 bytes per patch and
    # unit of the tower's width E (its RMSNorm input and three [T, 4E] bf16 tensors: 40,960 bytes per token at
    # E=1280, counted on CPU with autograd's saved-tensor hooks, 2026-12-06); LLaVA's Linear-GELU-Linear its input
    # (2E) and two [T, H] bf16 tensors (4 H bytes, by its structure, not measured). Whichever is larger counts
    "vision_projector_e": 8.0,
    "vision_projector_h": 4.0,
    # a rank's process in host memory (torch, CUDA, transformers, DeepSpeed), pinned staging excluded
    "host_base_gib": 6.0,
}

# bytes of optimizer state per trainable parameter (fp32 master weights included, as DeepSpeed keeps them)
OPTIMIZER_BYTES = {"adamw": 12, "adam": 12, "sgd": 8, "lion": 8, "adafactor": 6}

# the share of usable memory a plan may fill (the rest is the margin the prediction is allowed to be off by)
DEFAULT_MARGIN = 0.9


@dataclass(frozen=True)
class Workload:
    """What the plan is chosen for: the model's dimensions, the data's length and the run's layout."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int  # all parameters
    embedding_params: int  # the input embedding (no matmul)
    layer_params: int  # one decoder layer
    seq_len: int  # tokens per sequence (the full length, before sharding)
    rows: int = 1  # sequences per micro-batch
    sp: int = 1
    world_size: int = 1
    ranks_per_node: int = 1
    zero_stage: int = 3
    optimizer: str = "adamw"
    offload_optimizer: bool = False
    offload_parameters: bool = False
    trainable_params: Optional[int] = None  # None: all (full fine-tuning); LoRA: the adapters' count
    experts_per_token: int = 1  # MoE: each token's MLP work and activations scale with the experts it visits
    frozen_params: int = 0  # frozen companions (a DPO reference, a distillation teacher): weights only, no gradients
    packed: bool = False  # rows hold several samples (positions restarting): preference pairs, packed SFT data
    # a vision-language model's tower (its encoder / projector train: full fine-tuning without freeze_vision_tower /
    # freeze_projector) and the most vision tokens a row holds (None: any token may be one, the worst case)
    vision: Optional[VisionDims] = None
    vision_tokens: Optional[int] = None

    @property
    def local_tokens(self) -> int:
        return self.rows * math.ceil(self.seq_len / self.sp)

    @property
    def vision_params(self) -> int:
        return self.vision.n_params if self.vision is not None else 0

    @property
    def vision_trains(self) -> bool:
        return self.vision is not None and self.vision.trains and self.trainable_params is None

    @property
    def projector_trains(self) -> bool:
        return self.vision is not None and self.vision.projector_trains and self.trainable_params is None

    @property
    def trainable(self) -> int:
        return self.params if self.trainable_params is None else self.trainable_params

    @classmethod
    def from_config(cls, config: Any, seq_len: int, **layout: Any) -> "Workload":
        """From a transformers ``PretrainedConfig`` (the text part of a multimodal one)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        h, layers, heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        d = getattr(cfg, "head_dim", None) or h // heads
        experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
        top_k = getattr(cfg, "num_experts_per_tok", None) or 1
        inter = getattr(cfg, "moe_intermediate_size", None) if experts else None
        inter = inter or getattr(cfg, "intermediate_size", None) or 4 * h
        mlp = 3 * h * inter * max(experts, 1) + (h * experts if experts else 0)
        attn = h * heads * d + 2 * h * kv * d + heads * d * h
        layer = attn + mlp + 2 * h
        emb = cfg.vocab_size * h
        head = 0 if getattr(cfg, "tie_word_embeddings", False) else cfg.vocab_size * h
        return cls(hidden=h, intermediate=inter, layers=layers, heads=heads, kv_heads=kv, head_dim=d,
                   vocab=cfg.vocab_size, params=emb + head + layers * layer + h, embedding_params=emb,
                   layer_params=layer, seq_len=seq_len, experts_per_token=top_k if experts else 1, **layout)


@dataclass(frozen=True)
class Hardware:
    """Usable memory per GPU and host RAM per node (GiB)."""

    gpu_memory_gib: float
    host_memory_gib: float

    @classmethod
    def detect(cls, device: Any = None) -> "Hardware":
        """This machine: the GPU's total memory (``torch.cuda.mem_get_info``) and the node's available RAM."""
        import torch

        gpu = torch.cuda.mem_get_info(device)[1] / GiB if torch.cuda.is_available() else 0.0
        return cls(gpu, host_available_gib())


@dataclass(frozen=True)
class Estimate:
    """One plan's prediction."""

    name: str
    flags: dict[str, Any]
    gpu_peak_gib: float
    host_peak_gib: float  # per node
    step_time: float  # relative units (FLOPs x measured slowdowns); compare between plans only
    fits: bool = False
    speed: float = 1.0  # the fastest candidate's step time / this one's
    gpu_parts: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{self.name}: GPU {self.gpu_peak_gib:.1f} GiB, host {self.host_peak_gib:.1f} GiB/node, "
                f"speed {self.speed:.2f}")


class NothingFits(ValueError):
    """No memory plan fits; the message names the shortfall and the ways out, each with its predicted peak."""

    def __init__(self, message: str, estimates: list[Estimate]) -> None:
        super().__init__(message)
        self.estimates = estimates


def static_bytes(w: Workload) -> dict[str, float]:
    """Weights, gradients and optimizer state on one GPU, and on the host (per rank), as DeepSpeed ZeRO keeps them
    with bf16 weights: bf16 weights (2 bytes) and gradients (2), fp32 master weights + optimizer state."""
    world = w.world_size
    opt = OPTIMIZER_BYTES.get(w.optimizer.lower(), 12) * w.trainable
    weights = 2.0 * w.params / (world if w.zero_stage == 3 else 1)
    grads = 2.0 * w.trainable / (world if w.zero_stage >= 2 else 1)
    optimizer = opt / (world if w.zero_stage >= 1 else 1)
    # a frozen companion is a submodule of the LightningModule: DeepSpeed casts it to bf16 and ZeRO-3 partitions it
    frozen = 2.0 * w.frozen_params / (world if w.zero_stage == 3 else 1)
    # the tower's weights (whole under ZeRO 0-2), and the gradients and optimizer state of what trains of it (the
    # encoder, the projector; their activations: estimate())
    v = w.vision
    tower = ((v.n_params - v.projector_params if w.vision_trains else 0)
             + (v.projector_params if w.projector_trains else 0)) if v is not None else 0
    weights += 2.0 * w.vision_params / (world if w.zero_stage == 3 else 1)
    grads += 2.0 * tower / (world if w.zero_stage >= 2 else 1)
    optimizer += OPTIMIZER_BYTES.get(w.optimizer.lower(), 12) * tower / (world if w.zero_stage >= 1 else 1)
    gpu = {"weights": weights, "gradients": grads, "optimizer": optimizer, "frozen_weights": frozen}
    host = {}
    if w.offload_optimizer:
        host["optimizer"] = gpu.pop("optimizer") + 2.0 * w.trainable / world  # + fp32 gradients
    if w.offload_parameters and w.zero_stage == 3:
        host["weights"] = gpu.pop("weights") + gpu.pop("frozen_weights")
    gpu["lm_head_gradient"] = 2.0 * w.vocab * w.hidden if w.trainable_params is None else 0.0
    if w.zero_stage == 3:
        gpu["gathered_layer"] = 2.0 * 2.0 * w.layer_params  # one layer's weights + its gradient before reduction
        trained_share = w.trainable / w.params if w.params else 1.0  # LoRA: the adapters' share
        gpu["layer_buffers"] = (COEFFICIENTS["zero3_layer_param_bytes"] * w.layer_params * w.layers * trained_share
                                / world)
    return {**{f"gpu_{k}": v for k, v in gpu.items()}, **{f"host_{k}": v for k, v in host.items()}}


def estimate(name: str, flags: dict[str, Any], w: Workload, hw: Optional[Hardware] = None,
             margin: float = DEFAULT_MARGIN) -> Estimate:
    """The predicted peaks and step time of the plan given by the flat options ``flags``."""
    c = COEFFICIENTS
    h, inter, layers, s = w.hidden, w.intermediate * w.experts_per_token, w.layers, w.local_tokens
    ckpt = flags.get("gradient_checkpointing") is not False and (
        flags.get("gradient_checkpointing") or flags.get("checkpoint_policy", "full") != "full" or w.sp > 1)
    save_attention = ckpt and flags.get("checkpoint_policy", "full") == "save_attention"
    kept_attention = (flags.get("save_attention_layers") or layers) if save_attention else 0
    offload = ckpt and bool(flags.get("activation_checkpoint_cpu_offload"))
    keep = int(flags.get("activation_checkpoint_cpu_offload_keep_layers") or 0) if offload else 0
    rms, swiglu = bool(flags.get("memory_efficient_rmsnorm")), bool(flags.get("memory_efficient_swiglu"))
    tiled_mlp, tiled_attn = bool(flags.get("tiled_mlp")), bool(flags.get("tiled_attention_backward"))
    tiled_loss = flags.get("tiled_loss") is not False and (flags.get("tiled_loss") or w.sp > 1)

    parts = {k[4:]: v for k, v in static_bytes(w).items() if k.startswith("gpu_")}
    if ckpt:
        on_gpu_inputs = layers - (layers - keep if offload else 0)
        parts["layer_inputs"] = 2.0 * h * s * on_gpu_inputs
        parts["saved_attention"] = (2.0 * w.heads * w.head_dim + 4.0 * w.heads) * s * kept_attention
    else:
        per_layer = c["layer_activations_h"] * h + c["layer_activations_i"] * inter
        per_layer -= (c["rmsnorm_saves_h"] * h if rms else 0.0) + (c["swiglu_saves_i"] * inter if swiglu else 0.0)
        per_layer += c["packed_attention_h"] * h if w.packed else 0.0
        parts["layer_activations"] = per_layer * s * layers
    # the backward's working set: gradients in flight, and with checkpointing the recomputed layer's tensors plus the
    # larger of its untiled attention workspace (only where attention is recomputed) and its untiled MLP intermediates
    # (the two backwards run one after the other); without checkpointing those are the saved activations above
    # (a LoRA model's is a fully trained model's: 16 layers of 8B + LoRA r=16, full+offload+tiled, one H100,
    # 2026-12-06: 19.27 GiB at 131,072 tokens, 28.11 at 262,144, 19.14 and 28.19 predicted; 32 layers at 408,576:
    # 44.87, 45.13 predicted. A forward without grad --
    # validation -- holds less, ~13 H a token, since the tiled MLP tiles it too; before that it held ~33 H, which
    # earlier LoRA runs with Lightning's sanity check peaked on)
    work = c["working_set_h"] * h
    if ckpt:
        recomputes_attention = kept_attention < layers
        attention = c["untiled_attention_h"] * h if recomputes_attention and not tiled_attn else 0.0
        mlp = 0.0 if tiled_mlp else c["untiled_mlp_i"] * inter + (0.0 if swiglu else c["swiglu_saves_i"] * inter)
        work += max(attention, mlp)
    vision, vision_work = vision_bytes(w, ckpt, c)
    if vision:
        parts["vision"] = vision
    # the peak is inside one layer's backward (a tower block's, when it recomputes, comes after the decoder's), or
    # (without the tiled loss) in the loss over every token's logits
    parts["working_set"] = max(work * s, vision_work, 0.0 if tiled_loss else c["logits_v"] * w.vocab * s)
    parts["overhead"] = c["gpu_overhead_gib"] * GiB
    gpu = sum(parts.values()) / GiB

    host_rank = c["host_base_gib"] * GiB + sum(v for k, v in static_bytes(w).items() if k.startswith("host_"))
    if offload:
        host_rank += 2.0 * h * s * (layers - keep)
    host = host_rank * w.ranks_per_node / GiB

    flops = step_flops(w, ckpt, kept_attention)
    time = flops * (c["tiled_mlp_time"] if tiled_mlp else 1.0) * (c["offload_time"] if offload else 1.0)
    fits = hw is not None and gpu <= margin * hw.gpu_memory_gib and host <= margin * hw.host_memory_gib
    return Estimate(name, dict(flags), gpu, host, time, fits, gpu_parts={k: v / GiB for k, v in parts.items()})


def step_flops(w: Workload, checkpointing: bool, kept_attention: int) -> float:
    """FLOPs of one step: the language model's, what checkpointing recomputes (attention only in the layers that do
    not keep it), and a vision tower's matmuls (x3 when its encoder trains, + a recomputed forward under
    checkpointing; the projector x3 when it trains, never recomputed)."""
    from lightning_ulysses.models.flops import ModelDims, model_flops, recompute_flops, vision_flops

    dims = ModelDims(w.params - w.embedding_params, w.layers, w.heads * w.head_dim)
    tokens, sq = float(w.rows * w.seq_len), float(w.rows * w.seq_len) * w.seq_len
    flops = model_flops(dims, tokens, sq)
    if checkpointing:
        flops += recompute_flops(dims, tokens, sq, attention=1.0 - kept_attention / w.layers)
    if w.vision is not None:  # its matmuls (attention inside a unit is small next to the decoder's)
        patches = float(w.rows * min(w.vision_tokens or w.seq_len, w.seq_len) * w.vision.patches_per_token)
        dims = replace(w.vision, trains=w.vision_trains, projector_trains=w.projector_trains)  # LoRA: neither trains
        flops += vision_flops(dims, patches, 0.0, recompute=checkpointing)
    return flops


def vision_bytes(w: Workload, checkpointing: bool, c: dict[str, float] = COEFFICIENTS) -> tuple[float, float]:
    """A vision-language model's tower on one rank: what stays alive through the step (the batch's pixels, which
    every SP rank holds whole; the gathered features and their gradient; what the projector saves for backward when
    it or the encoder trains, on this rank's tokens; when the encoder trains its blocks' inputs under checkpointing,
    else every block's activations), and the working set of one tower block on one tile (its forward, or its
    recompute + backward). Each rank encodes ``1/sp`` of the units (``split_units``), a tile of
    whole units at a time (``tiles_of``). Bytes; 0 for text models.

    The block terms are what autograd saves in a Qwen2.5-VL block (counted on CPU; :data:`COEFFICIENTS`), not yet
    checked against a GPU peak."""
    v = w.vision
    if v is None:
        return 0.0, 0.0
    tokens = w.rows * min(w.vision_tokens or w.seq_len, w.seq_len)  # the batch's vision tokens
    local = math.ceil(tokens / w.sp) * v.patches_per_token  # patches this rank encodes
    from lightning_ulysses.models.multimodal import tower_tile_patches

    # one block's activations for one tile (the tower encodes a rank's units a tile at a time; a frozen tower's
    # tiles are larger)
    tile = tower_tile_patches(w.vision_trains)
    block = (c["vision_block_e"] * v.hidden + c["vision_block_i"] * v.intermediate) * min(local, tile)
    grads = w.vision_trains or w.projector_trains  # the features carry a gradient back into the tower
    alive = tokens * v.patches_per_token * v.patch_bytes + (4.0 if grads else 2.0) * w.hidden * tokens
    if grads:  # the projector (never checkpointed): Qwen-VL's merger, or LLaVA's two [T, H] tensors and its input
        per_token = max(c["vision_projector_e"] * v.patches_per_token * v.hidden,
                        2.0 * v.patches_per_token * v.hidden + c["vision_projector_h"] * w.hidden)
        alive += per_token * math.ceil(tokens / w.sp)
    if not w.vision_trains:  # a forward without autograd frees each block's tensors as it goes
        return alive, c["vision_forward_share"] * block
    alive += (2.0 * v.hidden * local if checkpointing else block) * v.layers
    return alive, block


def candidates(w: Workload, user_flags: Optional[dict[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """The plans to compare, each as flat options: :data:`CANDIDATES`, the ``save_attention`` dial (the first N layers
    keep their attention outputs), and ``keep_layers`` variants of the offload plans. The user's own options win:
    a trick the user switched or tuned keeps the user's settings in every plan. Plans the user's options make
    identical are one plan, named after the one whose own options they are (else the first): with
    ``gradient_checkpointing=True`` set, ``no_checkpointing`` is no longer a choice, and is not shown as one."""
    plans = dict(CANDIDATES)
    for n in sorted({max(1, w.layers * k // 8) for k in range(1, 8)} - {w.layers}):
        plans[f"save_attention[{n}]+offload"] = {**CANDIDATES["save_attention+offload"], "save_attention_layers": n}
    for base in ("save_attention+offload", "full+offload", "full+offload+tiled"):
        for keep in sorted({max(1, w.layers * k // 4) for k in range(1, 4)} - {w.layers}):
            plans[f"{base}, keep {keep}"] = {**CANDIDATES[base], "activation_checkpoint_cpu_offload_keep_layers": keep}
    out: dict[str, dict[str, Any]] = {}
    for name, flags in plans.items():
        merged = merge_user_flags(flags, user_flags or {})
        same = next((n for n, f in out.items() if f == merged), None)
        if same is None:
            out[name] = merged
        elif flags == merged and plans[same] != merged:  # this plan is what they all became: its name
            out = {(name if n == same else n): f for n, f in out.items()}
    return out


def merge_user_flags(plan: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """``plan`` with every trick the user set (its switch or one of its tuning options) taken from ``user``."""
    from lightning_ulysses.memory.plan import TRICKS

    out = dict(plan)
    for kind in TRICKS:
        names = [kind.flag, *kind.flag_options] if kind.flag else []
        if any(n in user for n in names):
            for n in names:
                out.pop(n, None)
            out.update({n: user[n] for n in names if n in user})
    return out


def choose(w: Workload, hw: Hardware, user_flags: Optional[dict[str, Any]] = None,
           margin: float = DEFAULT_MARGIN) -> tuple[Estimate, list[Estimate]]:
    """The fastest plan whose predicted peaks fit ``margin`` of the GPU's and the host's memory, and every estimate
    (fastest first). Raises :class:`NothingFits` (with the ways out) when none does."""
    estimates = [estimate(n, f, w, hw, margin) for n, f in candidates(w, user_flags).items()]
    fastest = min(e.step_time for e in estimates)
    estimates = sorted((replace(e, speed=fastest / e.step_time) for e in estimates),
                       key=lambda e: (e.step_time, e.gpu_peak_gib))
    fitting = [e for e in estimates if e.fits]
    if not fitting:
        raise NothingFits(nothing_fits_message(w, hw, estimates, user_flags, margin), estimates)
    return fitting[0], estimates


def longest_sequence(flags: dict[str, Any], w: Workload, hw: Hardware, margin: float = DEFAULT_MARGIN) -> int:
    """The longest sequence (a multiple of 1024 tokens x sp) the plan fits, 0 if none (bisection on the estimate)."""
    step = 1024 * w.sp
    lo, hi = 0, step
    while estimate("", flags, replace(w, seq_len=hi), hw, margin).fits and hi < 2**27:
        lo, hi = hi, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if estimate("", flags, replace(w, seq_len=mid), hw, margin).fits else (lo, mid)
    return lo


def nothing_fits_message(w: Workload, hw: Hardware, estimates: list[Estimate], user_flags: Optional[dict[str, Any]],
                         margin: float) -> str:
    """What is short and the ways out that would fit, each with its predicted peak."""
    leanest = min(estimates, key=lambda e: e.gpu_peak_gib)
    lines = [
        f"No memory plan fits {w.seq_len:,} tokens per sequence (sp={w.sp}, {w.layers} layers, hidden {w.hidden}) in "
        f"{margin:.0%} of {hw.gpu_memory_gib:.1f} GiB GPU / {hw.host_memory_gib:.1f} GiB host memory: the leanest, "
        f"{leanest.name}, needs {leanest.gpu_peak_gib:.1f} GiB GPU and {leanest.host_peak_gib:.1f} GiB host per node.",
        "Ways out that would fit:",
    ]
    ways: list[tuple[str, Workload, Optional[dict[str, Any]]]] = []
    for sp in (2, 4, 8, 16, 32, 64, 128, 256):  # the smallest SP degree that fits (more GPUs per sequence)
        alt = replace(w, sp=sp, world_size=max(w.world_size, sp), ranks_per_node=max(w.ranks_per_node, min(sp, 8)))
        if sp > w.sp and any(estimate("", e.flags, alt, hw, margin).fits for e in estimates):
            ways.append((f"sequence_parallel_size={sp} ({sp} GPUs per sequence)", alt, user_flags))
            break
    if w.zero_stage != 3:
        ways.append(("stage: 3 (weights partitioned)", replace(w, zero_stage=3), user_flags))
    if not w.offload_optimizer:
        ways.append(("offload_optimizer: true (optimizer state in host memory)", replace(w, offload_optimizer=True),
                     user_flags))
    if w.trainable_params is None:
        ways.append(("LoRA (CausalLMModule(peft=...)): only adapters train",
                     replace(w, trainable_params=max(1, w.params // 200)), user_flags))
    found = []
    for text, alt, flags in ways:
        try:
            best, _ = choose(alt, hw, flags, margin)
        except NothingFits:
            continue
        found.append(f"  - {text}: {best.name}, GPU {best.gpu_peak_gib:.1f} GiB, host {best.host_peak_gib:.1f} GiB")
    longest = max(longest_sequence(e.flags, w, hw, margin) for e in estimates)
    if longest:
        found.append(f"  - sequences of at most {longest:,} tokens at this layout")
    lines += found or ["  - none of sp, ZeRO-3, optimizer offload or LoRA alone; use more GPUs per sequence."]
    return "\n".join(lines)


def lora_params(w: Workload, peft: Any) -> int:
    """Trainable parameters of LoRA adapters on every linear of the decoder (``r x (in + out)`` each): a dict or a
    ``PeftConfig``; its ``r`` (default 8). An upper bound when ``target_modules`` names fewer layers."""
    r = peft.get("r", 8) if isinstance(peft, dict) else getattr(peft, "r", 8)
    h, i, q, kv = w.hidden, w.intermediate, w.heads * w.head_dim, w.kv_heads * w.head_dim
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) * w.experts_per_token + (i + h) * w.experts_per_token
    return int(r) * per_layer * w.layers


def optimizer_name(factory: Any) -> str:
    """``"adamw"`` for ``torch.optim.AdamW`` (a class, a ``functools.partial`` of one, LightningCLI's callable)."""
    target = getattr(factory, "func", factory)
    name = getattr(target, "__name__", "") or type(target).__name__
    if name in ("", "function", "partial") and hasattr(factory, "__qualname__"):
        name = factory.__qualname__
    return name.lower()


def workload_for_run(config: Any, seq_len: int, *, rows: int = 1, sequence_parallel_size: Any = "auto",
                     world_size: int = 1, ranks_per_node: int = 1, zero_stage: int = 3, optimizer: str = "adamw",
                     offload_optimizer: bool = False, offload_parameters: bool = False, peft: Any = None,
                     context_parallel_mode: str = "auto", ulysses_size: Optional[int] = None,
                     ring_size: Optional[int] = None, frozen: Sequence[Any] = (), packed: bool = False,
                     freeze_vision_tower: bool = False, freeze_projector: bool = False,
                     vision_tokens: Optional[int] = None) -> Workload:
    """The :class:`Workload` of a run as the strategy sees it before the model is built: the layout resolved from
    the config's head counts as :meth:`ParallelLayout.resolve <lightning_ulysses.parallel.layout.ParallelLayout.resolve>`
    does (a model that cannot be sequence-sharded is resolved at setup; here it counts as asked). ``frozen``: the
    configs of frozen companion models (a DPO reference, a distillation teacher), counted as weights only; ``packed``:
    rows hold several samples; ``freeze_vision_tower`` / ``freeze_projector``: a vision-language model's encoder /
    projector does not train;
    ``vision_tokens``: the most vision tokens in a row (None: every token may be one)."""
    from lightning_ulysses.parallel.layout import ParallelLayout

    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    # the attention implementation is checked at setup, where the model exists; the layout needs only the heads
    layout = ParallelLayout.resolve(sequence_parallel_size, world_size, heads, kv, "sdpa", mode=context_parallel_mode,
                                    ulysses_size=ulysses_size, ring_size=ring_size, gpus_per_node=ranks_per_node)
    w = Workload.from_config(config, seq_len, rows=rows, sp=layout.sp, world_size=world_size,
                             ranks_per_node=ranks_per_node, zero_stage=zero_stage, optimizer=optimizer,
                             offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
                             frozen_params=sum(Workload.from_config(c, seq_len).params for c in frozen), packed=packed,
                             vision=vision_dims(config, trains=not freeze_vision_tower,
                                                projector_trains=not freeze_projector),
                             vision_tokens=vision_tokens)
    return replace(w, trainable_params=lora_params(w, peft)) if peft is not None else w


def vision_tower_params(config: Any) -> int:
    """Parameters of a supported vision-language model's tower (encoder + projector), counted on a model built on
    the meta device (no memory, no weights read); 0 for a text model."""
    return _tower_counts(config)[0]


def _tower_counts(config: Any) -> tuple[int, int]:
    """(tower parameters with the projector, the projector's) of a supported vision-language config; (0, 0) else."""
    from lightning_ulysses.models.multimodal import SUPPORTED_VLMS

    family = SUPPORTED_VLMS.get(getattr(config, "model_type", ""))
    if family is None:
        return 0, 0
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(family.tower(model)), count(family.projector(model))


def vision_dims(config: Any, trains: bool = True, projector_trains: bool = True) -> Optional[VisionDims]:
    """The tower's :class:`~lightning_ulysses.models.flops.VisionDims` of a supported vision-language config (its
    parameters counted on the meta device); ``None`` for a text model. ``trains``: the encoder trains (not
    ``freeze_vision_tower``); ``projector_trains``: the projector trains (not ``freeze_projector``)."""
    params, projector = _tower_counts(config)
    return VisionDims.from_config(config, params, trains, projector, projector_trains) if params else None


def host_available_gib() -> float:
    """``MemAvailable`` of this node (Linux); the total RAM elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


__all__ = ["COEFFICIENTS", "DEFAULT_MARGIN", "Estimate", "Hardware", "NothingFits", "Workload", "candidates", "choose",
           "estimate", "host_available_gib", "longest_sequence", "lora_params", "merge_user_flags", "optimizer_name",
           "static_bytes", "step_flops", "vision_bytes", "vision_dims", "vision_tower_params", "workload_for_run"]
