"""``UlyssesDeepSpeedStrategy``: Lightning's DeepSpeed strategy plus Ulysses sequence parallelism.

The strategy only orchestrates; each decision lives in its own module, called from one hook:

* options -> checked where they belong (:func:`~lightning_ulysses.parallel.layout.check_sp_options`, the memory
  plan's :func:`~lightning_ulysses.memory.plan.tricks_from_flags`) in ``__init__``;
* layout and process groups -> :meth:`ParallelLayout.for_model <lightning_ulysses.parallel.layout.ParallelLayout.for_model>`
  (:meth:`setup`, once the model and its head counts exist; handed to DeepSpeed as its ``mpu``);
* attention patching -> :mod:`lightning_ulysses.parallel.ulysses`, memory tricks -> :mod:`lightning_ulysses.memory`
  (:meth:`setup`; removed again in :meth:`teardown`);
* batch preparation, the SP group's agreement check and sharding -> :mod:`lightning_ulysses.parallel.sharding`
  (:meth:`batch_to_device`);
* what the step's layers and losses read (token counts and loss normalisation, positions, packed segments, token
  mask, the tiled MLP's tile count) -> :func:`lightning_ulysses.parallel.step_context.build` (:meth:`batch_to_device`),
  with the window look-ahead of :mod:`lightning_ulysses.parallel.accumulation`;
* DP-only sampling -> :attr:`distributed_sampler_kwargs` (all ranks of an SP group read the same samples);
* loss scale for DeepSpeed's reduction -> :mod:`lightning_ulysses.parallel.loss` (:meth:`backward`);
* gradient accumulation: Lightning owns the optimizer-step boundary, exactly as under DDP
  (:attr:`handles_gradient_accumulation` is ``False``; DeepSpeed is told each boundary and never divides
  the loss a second time, see :meth:`backward`);
* checkpoints -> :mod:`lightning_ulysses.checkpoint` (:meth:`save_checkpoint`, :meth:`load_checkpoint`);
* ZeRO-3 settings chosen for long sequences -> :mod:`lightning_ulysses.memory.zero_config` (``__init__``);
* CPU (gloo) support -> :mod:`lightning_ulysses.lightning.cpu`.
"""

from __future__ import annotations

import argparse
import os
from collections import deque
from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Optional, Union

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ulysses.checkpoint import CheckpointError, ResumableLoader, SavedLayout, needs_resharding, read_layout, verify_checkpoint
from lightning_ulysses.checkpoint.files import optimizer_record, publish, remove_stale_staging, staging_path, write_manifest
from lightning_ulysses.checkpoint.resharding import universal_tag
from lightning_ulysses.checkpoint.rng import load_rng_state, save_rng_state
from lightning_ulysses.compat.deepspeed import (
    cast_late_parameters, clear_zero3_caches, forward_stack_kept, release_engine, universal_loading, use_mpu,
)
from lightning_ulysses.compat.lightning import (
    batches_done_in_epoch, ddp_setup_environment, lightning_step_boundary, train_loader_batch_size,
)
from lightning_ulysses.compat.transformers import TransformersZero3, attn_implementation
from lightning_ulysses.errors import errors_reported_once, raise_once
from lightning_ulysses.lightning import cpu
from lightning_ulysses.memory import (
    TRICKS, MemoryTrick, TiledMLP, apply_tricks, remove_tricks, trainer_tricks, tricks_from_flags,
)
from lightning_ulysses.memory.auto import Estimate
from lightning_ulysses.memory.plan import flat_options
from lightning_ulysses.memory.tiled_mlp import tiles_mlp
from lightning_ulysses.lightning.auto_plan import known_sequence_length, plan_for_trainer
from lightning_ulysses.memory.allocator import set_expandable_segments
from lightning_ulysses.memory.zero_config import release_zero3_params_after_use
from lightning_ulysses.models.inspect import find_hf_model, find_hf_models
from lightning_ulysses.models.multimodal import (
    apply_multimodal, prepare_multimodal, remove_multimodal, sp_target, vlm_family, zero3_leaf_tower_blocks,
)
from lightning_ulysses.parallel.accumulation import WindowTokenCounter
from lightning_ulysses.parallel.layout import (
    COMM_DTYPES, SUPPORTED_ATTN_IMPLEMENTATIONS, ParallelLayout, ProcessGroups, SPSize, check_sp_options,
    collective_timeout,
)
from lightning_ulysses.parallel.loss import deepspeed_loss_scale
from lightning_ulysses.parallel import step_context
from lightning_ulysses.parallel.sharding import check_group_agrees, check_token_ids, prepare_for_sharding, shard_batch
from lightning_ulysses.parallel.step_context import check_loss_normalization, set_step_context
from lightning_ulysses.parallel.ulysses import apply_ulysses, remove_ulysses

_FLAT_OPTIONS = flat_options()  # the memory tricks' flat options and defaults (memory/plan.py), spelled in __init__


class UlyssesDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO (0-3) with Ulysses sequence parallelism over an SP x DP layout.

    Args:
        sequence_parallel_size: ranks that share one sequence, or ``"auto"``: the largest degree that
            divides the world size and that the model's heads allow for Ulysses alone (kv heads may be
            replicated). The remaining factor of the world is data parallel.
        context_parallel_size: the same number under its other common name (give one of the two).
        context_parallel_mode: how ``sp`` splits into ``ulysses x ring``: ``"auto"`` (largest Ulysses
            degree the heads allow, kept inside a node; the rest is a ring), ``"hybrid"`` (both > 1),
            ``"ulysses_only"``, ``"ring_only"``. ``ulysses_size`` / ``ring_size`` set it by hand.
        ring_zigzag: zigzag (load-balanced) ring layout; ``False`` gives contiguous chunks.
        ring_attention_backend: block kernel of ring attention (``"auto"``, ``"cudnn"``, ``"flash"``,
            ``"cpu"``, ``"math"``).
        pad_to_multiple_of: sequences are right-padded (never truncated) to a multiple of this;
            defaults to ``sp`` (``2 * sp`` with a zigzag ring). On GPUs ``256 * sp`` keeps kernels on fast paths.
        pad_token_id: token id used for that padding (its label is always -100).
        seq_parallel_communication_data_type: dtype of the attention all-to-alls (``"fp32"``,
            ``"bf16"``); ``None`` sends activations in their own dtype.
        The memory tricks' flat options (ArcticTraining's names; the README's trick table). A switch is ``True``
        (on), ``False`` (off) or ``None`` (unset: off, or on under SP where said). A tuning option given without its
        switch turns the trick on; with the switch ``False`` it is an error (:func:`~lightning_ulysses.memory.plan.tricks_from_flags`).

        gradient_checkpointing: recompute decoder layers in backward; ``None``: on when sp > 1.
        checkpoint_policy: ``"full"`` recomputes whole layers; ``"save_attention"`` (selective
            checkpointing) keeps each layer's attention output + log-sum-exp so attention is not
            recomputed -- faster at long sequences, one attention output per layer more memory
            (pair it with ``activation_checkpoint_cpu_offload``).
        save_attention_layers: with ``checkpoint_policy="save_attention"``, only the first this many decoder
            layers keep their attention outputs (the rest recompute attention); lowers the policy's memory
            by one attention output per layer left out. ``None``: every layer.
        tiled_loss: lm_head + cross-entropy in token tiles, never materialising the logits; ``None``: on when sp > 1.
        tiled_loss_tile_tokens: tokens per tile of the tiled loss (``None``: chosen from the vocabulary size).
        tiled_loss_impl: its kernel: ``"auto"`` (Liger's fused linear cross-entropy on CUDA when installed, else
            torch), ``"torch"``, ``"liger"``.
        tiled_mlp: compute each layer's MLP in token tiles (forwards without grad too; a frozen DPO reference's
            or distillation teacher's as well, for the fit).
        tiled_mlp_tile_tokens: tokens per MLP tile (``None``: the hidden size).
        memory_efficient_rmsnorm: RMSNorms save their input instead of an fp32 copy for backward.
        memory_efficient_swiglu: SiLU-gated MLPs save ``gate`` and ``up`` only (``silu(gate)`` is
            recomputed in backward): one ``[tokens, intermediate]`` tensor less per layer.
        memory_efficient_impl: kernels of those two: ``"auto"`` (Liger's Triton kernels on CUDA when
            liger-kernel is installed, else torch), ``"torch"``, ``"liger"``.
        tiled_attention_backward: run the attention backward on query x key tiles with the forward's output and
            log-sum-exp, instead of the kernel's whole-sequence backward whose workspace (fp32 dQ + head-expanded
            dK/dV) is the largest transient at long sequences. ``sdpa`` models; ring attention's backward is
            blockwise already (the option does not change it).
        tiled_attention_tile_tokens: query/key tile of that backward (``None``: 16384).
        activation_checkpoint_cpu_offload: keep checkpointed layer inputs in CPU memory until backward.
        activation_checkpoint_cpu_offload_keep_layers: with offload, the first this many layer inputs stay on
            the GPU: each moves ``2 * hidden`` bytes per local token from pinned host memory (shared by the
            node's ranks, often the limit at millions of tokens) to GPU memory.
        memory: ``"auto"``: the strategy picks the fastest memory plan whose predicted GPU and host peaks fit
            (:mod:`lightning_ulysses.memory.auto`; ``lightning-ulysses plan`` prints the candidates), before the model
            is built, and fails then with the ways out when none fits; flat options the user sets still win. Or
            memory tricks as objects (:mod:`lightning_ulysses.memory`; YAML: ``class_path`` entries), with all
            their options. The flat flags above (ArcticTraining's names) build the same objects; a kind given here
            replaces the flag-built one (a kind given both ways with a non-default flag is an error). The tricks
            are applied in one fixed order in :meth:`setup`, together with any passed to ``Trainer(callbacks=...)``
            (a callback of a kind replaces the strategy's).
        max_seq_len: tokens per sequence ``memory="auto"`` plans for (default: the data module's ``seq_len``).
        expandable_segments: set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless already set.
        loss_normalization: how micro-batch losses combine into the optimizer step's gradient (see
            :mod:`lightning_ulysses.parallel.step_context`): ``"batch_mean"`` (default; Lightning DDP's: each micro-batch's
            token mean, averaged over micro-batches and DP ranks) or ``"global_tokens"`` (every valid token of
            the step on all DP ranks weighs the same; for variable-length SFT data).
        timeout: how long a rank waits in a collective for the others before the job fails, in seconds (or a
            ``timedelta``). The longest legitimate wait is one layer's compute, a checkpoint write or rank 0
            preparing data; a crashed or hung peer ends the job after this long. NCCL's asynchronous error
            handling is turned on (``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` unless set), so on GPUs a timed-out
            collective aborts the process instead of hanging it.
        zero3_prefetch: keep DeepSpeed's ZeRO-3 parameter prefetch and reuse along its recorded trace. Off by
            default: ``stage3_prefetch_bucket_size`` and ``stage3_max_reuse_distance`` become 0 unless the
            config names them, so every layer's parameters are released after use instead of the last
            layers staying gathered into backward (+1.5 GiB peak for Llama-3-8B at no measured speed gain;
            see :mod:`lightning_ulysses.memory.zero_config`). Turn on where all-gathers are slow (across nodes).
        stage, ...: everything else is :class:`lightning.pytorch.strategies.DeepSpeedStrategy`'s.

    """

    strategy_name = "ulysses"

    @errors_reported_once  # every rank builds the strategy from the same options: one report of a bad one
    def __init__(  # long: 40 lines are the signature (one per option); the body checks and stores them
        self,
        sequence_parallel_size: SPSize = "auto",
        context_parallel_size: Optional[int] = None,
        context_parallel_mode: str = "auto",
        ulysses_size: Optional[int] = None,
        ring_size: Optional[int] = None,
        ring_zigzag: bool = True,
        ring_attention_backend: str = "auto",
        pad_to_multiple_of: Optional[int] = None,
        pad_token_id: int = 0,
        seq_parallel_communication_data_type: Optional[str] = None,
        gradient_checkpointing: Optional[bool] = None,
        checkpoint_policy: str = "full",
        save_attention_layers: Optional[int] = None,
        tiled_loss: Optional[bool] = None,
        tiled_loss_tile_tokens: Optional[int] = None,
        tiled_loss_impl: str = "auto",
        tiled_mlp: Optional[bool] = None,
        tiled_mlp_tile_tokens: Optional[int] = None,
        memory_efficient_rmsnorm: Optional[bool] = None,
        memory_efficient_swiglu: Optional[bool] = None,
        memory_efficient_impl: str = "auto",
        tiled_attention_backward: Optional[bool] = None,
        tiled_attention_tile_tokens: Optional[int] = None,
        activation_checkpoint_cpu_offload: Optional[bool] = None,
        activation_checkpoint_cpu_offload_keep_layers: int = 0,
        memory: Union[list[MemoryTrick], str, None] = None,
        max_seq_len: Optional[int] = None,
        expandable_segments: bool = True,
        zero3_prefetch: bool = False,
        loss_normalization: str = "batch_mean",
        timeout: Union[float, timedelta, None] = 1800.0,
        stage: int = 3,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        config: Optional[Union[str, dict[str, Any]]] = None,
        **kwargs: Any,
    ) -> None:
        # the memory tricks: one plan of MemoryTrick objects; the flat options are an alias that builds the same objects
        flags = {name: value for name, value in locals().items() if name in _FLAT_OPTIONS}
        check_loss_normalization(loss_normalization)
        if expandable_segments:
            set_expandable_segments()
        super().__init__(
            stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters, config=config,
            timeout=collective_timeout(timeout), **kwargs,
        )
        self.loss_normalization = loss_normalization
        self.empty_batches = 0  # training micro-batches with no token to predict (loss 0, no gradient)
        self._window_tokens: deque = deque()
        self._hf_zero3 = TransformersZero3()
        self.zero3_prefetch = zero3_prefetch
        if not zero3_prefetch:
            release_zero3_params_after_use(self.config)
        sequence_parallel_size = check_sp_options(
            sequence_parallel_size, context_parallel_size, context_parallel_mode, ring_attention_backend,
            pad_to_multiple_of, seq_parallel_communication_data_type,
        )
        self.sequence_parallel_size = sequence_parallel_size
        self.context_parallel_mode = context_parallel_mode
        self.ulysses_size = ulysses_size
        self.ring_size = ring_size
        self.ring_zigzag = ring_zigzag
        self.ring_attention_backend = ring_attention_backend
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id
        self.seq_parallel_communication_data_type = seq_parallel_communication_data_type
        if isinstance(memory, str) and memory != "auto":
            raise ValueError(f"memory must be a list of MemoryTrick objects or 'auto', got {memory!r}.")
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2):
            raise ValueError(f"max_seq_len must be an int >= 2 (tokens per sequence) or None, got {max_seq_len!r}.")
        self.memory_auto = memory == "auto"
        self.max_seq_len = max_seq_len
        self.memory_estimate: Optional[Estimate] = None  # memory="auto": the chosen plan's prediction
        self._packed_rows_warning: Optional[str] = None  # memory="auto": given at the first packed batch, if any
        self.memory_user_flags = {k: v for k, v in flags.items() if v != _FLAT_OPTIONS[k]}  # what memory="auto" keeps
        self.memory_plan = tricks_from_flags(None if self.memory_auto else memory, **flags)
        self.memory_tricks: list[MemoryTrick] = []  # the resolved plan, applied in setup()
        self._applied_tricks: list[MemoryTrick] = []  # what setup() applied (with the Trainer's trick callbacks)
        self._companion_tricks: list[MemoryTrick] = []  # what setup() applied to frozen companions
        self._vocab_size: Optional[int] = None  # rows of the model's input embedding: every batch's ids are checked
        self._vlm: Optional[torch.nn.Module] = None  # the trained model when it is vision-language (batches get slots)
        self.groups: Optional[ProcessGroups] = None
        self._rng_checkpoint: Optional[str] = None  # a resumed checkpoint whose RNG states are still to restore

    # ----------------------------------------------------------------------------------- layout
    @property
    def layout(self) -> Optional[ParallelLayout]:
        return self.groups.layout if self.groups is not None else None

    @property
    def sp_group(self) -> Optional[torch.distributed.ProcessGroup]:
        """The SP group to pass to :func:`lightning_ulysses.parallel.loss.sp_causal_lm_loss` (None when sp == 1)."""
        return self.groups.sp_group if self.groups is not None else None

    def _resolve_layout(self) -> ParallelLayout:
        return ParallelLayout.for_model(
            find_hf_model(self.lightning_module) if self.lightning_module is not None else None,
            self.sequence_parallel_size, self.world_size, mode=self.context_parallel_mode,
            ulysses_size=self.ulysses_size, ring_size=self.ring_size,
            gpus_per_node=self.num_processes if self.num_processes > 0 else None,
        )

    # ------------------------------------------------------------------------- lightning hooks
    @property
    @override
    def parallel_devices(self) -> Optional[list[torch.device]]:
        return self._parallel_devices

    @parallel_devices.setter
    @override
    def parallel_devices(self, parallel_devices: Optional[list[torch.device]]) -> None:
        self._parallel_devices = cpu.index_devices(parallel_devices)

    @override
    def setup_environment(self) -> None:
        # Before the process group exists: with it, NCCL's watchdog aborts a rank whose collective failed or
        # waited `timeout` (a dead peer on another node) instead of leaving it hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if cpu.is_cpu(self.accelerator):
            cpu.prepare_deepspeed_for_cpu()
            ddp_setup_environment(self)
        else:
            super().setup_environment()
        if self.memory_auto:  # before the model is built: a plan that cannot fit fails in seconds, not after loading
            self._choose_memory_plan()

    @errors_reported_once  # every rank makes the same choice: one report of "nothing fits"
    def _choose_memory_plan(self) -> None:
        chosen, estimates, source, self._packed_rows_warning = plan_for_trainer(self, self.lightning_module.trainer)
        self.memory_plan = tricks_from_flags(**chosen.flags)
        self.memory_estimate = chosen
        runner_up = next((e for e in estimates if e.fits and e is not chosen), None)
        rank_zero_info(
            f"lightning_ulysses memory=auto: {chosen.describe()} (predicted peaks; sequence length from {source})"
            + (f"; runner-up {runner_up.describe()}" if runner_up else "")
        )

    @override
    @errors_reported_once  # every rank resolves the same layout and refuses the same tricks: one report
    def setup(self, trainer: Any) -> None:
        # a forward run on a ZeRO-3 model after an earlier fit cached that engine again (see release_engine)
        clear_zero3_caches()
        layout = self._resolve_layout()
        if self.groups is None or self.groups.layout != layout:
            self.groups = ProcessGroups.build(layout)
            rank_zero_info(f"lightning_ulysses layout: {layout.describe(self.num_nodes)}")
        hf_model = find_hf_model(self.lightning_module)
        self._vocab_size = _embedding_rows(hf_model, trainer)
        self._vlm = hf_model if vlm_family(hf_model) is not None else None
        # under SP: Ulysses/ring attention. At sp=1 the same handler keeps packed samples apart: sdpa per segment (no
        # dense mask); eager with the samples' mask (transformers separates packed samples itself only in calls
        # without a KV cache); flash kernels through varlen cu_seqlens (transformers does so only for one-row batches)
        # the trained model and any frozen companion (reference, teacher) see the same sharded batch: same attention
        names = {id(m): n for n, m in self.lightning_module.named_modules()}
        seq_len = known_sequence_length(self, trainer)[0]
        for model in find_hf_models(self.lightning_module):
            if model is not hf_model:  # a frozen companion must run at the layout chosen for the trained model
                layout.check_companion(model, names.get(id(model), type(model).__name__), hf_model, seq_len)
            # a vision-language model: the sequence is sharded at its language model's input, where the vision
            # features are merged in; the tower attends within whole images and is not wrapped
            apply_multimodal(model)
            if self.zero_stage_3:  # a frozen tower's blocks are fetched whole: one ZeRO-3 hook each, not ~11
                zero3_leaf_tower_blocks(model)
            target = sp_target(model)
            if layout.sp_enabled or attn_implementation(target) in SUPPORTED_ATTN_IMPLEMENTATIONS:
                comm = COMM_DTYPES.get(self.seq_parallel_communication_data_type or "")
                apply_ulysses(target, self.groups, comm_dtype=comm, ring_zigzag=self.ring_zigzag,
                              ring_backend=self.ring_attention_backend)
            else:
                remove_ulysses(target)
        if hf_model is not None:
            # one ordered plan: this strategy's tricks and any the project passed as callbacks, before DeepSpeed
            # wraps the model (the callbacks re-apply the same plan at each stage start; applying is idempotent)
            self.memory_tricks = self.memory_plan.resolve(layout.sp_enabled)
            self._applied_tricks = apply_tricks(hf_model, trainer_tricks(trainer))
            # a frozen companion (reference, teacher) only runs forwards without grad; of the plan, the tiled MLP
            # bounds those too (untiled, its gate/up/product for every token at once: ~33 H bytes a token at 8B width,
            # more than the trained model's checkpointed step holds)
            self._companion_tricks = [t for t in self._applied_tricks if isinstance(t, TiledMLP)]
            for model in find_hf_models(self.lightning_module):
                if model is not hf_model and tiles_mlp(model):
                    apply_tricks(model, self._companion_tricks)
        super().setup(trainer)

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        # configure_model runs in here: under ZeRO-3, transformers' own ZeRO-3 path must be on so that
        # from_pretrained loads into the partitions and from_config runs the model's weight init (DeepSpeed
        # counts nested zero.Init contexts; the outer one of Lightning only partitions what transformers builds).
        # Only while the model is built: left on, transformers would wrap any model built later in zero.Init, a
        # collective that a rank building one alone (a callback, an evaluation helper) would enter by itself.
        if self.zero_stage_3 and not self._hf_zero3.enabled:
            self._init_config_if_needed()
            self._hf_zero3.enable(self.config)
        try:
            with super().model_sharded_context():
                yield
        finally:
            self._hf_zero3.disable()

    @property
    @override
    def handles_gradient_accumulation(self) -> bool:
        # Lightning decides when the optimizer steps, as under DDP (every `accumulate_grad_batches` batches and
        # at the epoch's last batch) and calls `engine.step()` only then (see `backward`); DeepSpeed's own
        # micro-step counter would carry windows across epochs and never step on a short last window.
        return False

    @override
    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        assert self.groups is not None, "setup() must resolve the layout before DeepSpeed is initialised"
        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        mpu = self.groups.deepspeed_mpu() if self.groups.sp > 1 else None
        use_mpu(mpu)  # also None: DeepSpeed would otherwise keep an earlier engine's groups
        cast_late_parameters(model, self.config)  # LoRA adapters added after zero.Init: bf16 as at ZeRO 0-2
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.root_device.index),
            config=self.config,
            model=model,
            model_parameters=model_parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
            mpu=mpu,
        )
        return engine, ds_optimizer

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        # Samples are split over DP groups only: every rank of an SP group must read the same sample.
        layout = self.layout
        if layout is None:
            if self.sequence_parallel_size == "auto":
                raise RuntimeError("The SP layout is resolved in setup(); the sampler was requested before it.")
            layout = ParallelLayout(self.world_size, self.sequence_parallel_size)
        return {"num_replicas": layout.dp, "rank": layout.dp_rank(self.global_rank)}

    @override
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.training and self.layout is not None:
            # its position in the epoch goes into checkpoints: a resumed run reads the next unread samples
            dataloader = ResumableLoader(
                dataloader, lambda: (trainer.current_epoch, batches_done_in_epoch(trainer)), self.layout.dp,
                on_resume=self._restore_rng_state,
            )
        if self.loss_normalization == "global_tokens" and trainer is not None and trainer.training:
            # read one accumulation window ahead so each micro-batch knows the step's token count
            return WindowTokenCounter(
                dataloader,
                trainer.accumulate_grad_batches,
                self._window_tokens,
                lambda: getattr(trainer, "num_training_batches", float("inf")),
            )
        return dataloader

    @override
    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        """Prepare the full batch (labels shifted, positions, padding), check that the SP group agrees on it,
        keep this rank's shard, move it, and record the batch's :class:`StepContext`.

        Every degree gets the same keys (``input_ids``, ``position_ids``, ``shift_labels`` + pass-through
        entries), sp=1 and one process included, so a ``training_step`` never changes with the layout.
        """
        groups = self.groups
        sp, sp_rank, ring = (groups.sp, groups.sp_rank, groups.ring) if groups is not None else (1, 0, 1)
        full, error = None, None
        try:
            full = prepare_for_sharding(batch, sp, self.pad_to_multiple_of, self.pad_token_id, ring, self.ring_zigzag)
            check_token_ids(full["input_ids"], self._vocab_size)
            if self._vlm is not None:  # vision slots and 3-D positions of the whole sequence, sharded with it
                full = prepare_multimodal(full, self._vlm)
        except (TypeError, ValueError, KeyError) as exc:
            error = exc
        if sp > 1:  # a rank that failed, or a batch that differs, must stop the whole group before any all-to-all
            check_group_agrees(full, error, groups, self.root_device if self.root_device.type == "cuda" else torch.device("cpu"))
        if error is not None:
            raise error
        local = super().batch_to_device(shard_batch(full, sp_rank, sp, ring=ring, zigzag=self.ring_zigzag), device,
                                        dataloader_idx)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        training = bool(trainer is not None and trainer.training)
        global_tokens = training and self.loss_normalization == "global_tokens"
        ctx = step_context.build(
            batch=batch, full=full, local=local, groups=groups, zigzag=self.ring_zigzag, training=training,
            loss_normalization=self.loss_normalization,
            window_tokens=self._window_tokens.popleft() if global_tokens and self._window_tokens else None,
            accumulate_grad_batches=trainer.accumulate_grad_batches if trainer is not None else 1,
            world_max_tokens=self.zero_stage_3 and any(isinstance(t, TiledMLP) for t in self._applied_tricks),
        )
        if training and ctx.num_valid_tokens == 0:
            self._note_empty_batch()
        if self._packed_rows_warning is not None and ctx.segments is not None:
            rank_zero_warn(self._packed_rows_warning)
            self._packed_rows_warning = None  # once
        set_step_context(ctx)
        return local

    @override
    def _auto_select_batch_size(self) -> int:
        # Lightning's reads `loader.batch_sampler.batch_size` and fails on a loader without one before the strategy
        # sees a batch; the batch itself is then checked (and an unbatched one refused) in batch_to_device
        return train_loader_batch_size(self.lightning_module.trainer)

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        # DDP's no_sync has no DeepSpeed equivalent under ZeRO-2/3 (the engine refuses it): gradients are
        # reduced or held per the boundary `backward` gives the engine, so nothing needs blocking here.
        yield

    def _note_empty_batch(self) -> None:
        self.empty_batches += 1
        if self.empty_batches == 1:
            rank_zero_warn(
                "lightning_ulysses: a training batch has no token to predict (every label is -100, or sequences of "
                "one token). It contributes loss 0 and no gradient; `trainer.strategy.empty_batches` counts such "
                "batches. Check the data (label masking, sequence lengths) if this is unexpected."
            )

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        scale = deepspeed_loss_scale(self.config.get("zero_optimization", {}), self.groups.sp if self.groups else 1)
        if scale != 1.0:
            closure_loss = closure_loss * scale
        trainer = self.lightning_module.trainer
        if trainer.accumulate_grad_batches > 1 and self.lightning_module.automatic_optimization:
            # DeepSpeed reduces gradients in the backward it is told ends the window; that is Lightning's
            # boundary (every `accumulate_grad_batches` batches and the epoch's last batch), not its own counter.
            self.model.set_gradient_accumulation_boundary(lightning_step_boundary(trainer))
        # Lightning already divided the loss by accumulate_grad_batches; DeepSpeed must not divide it again.
        kwargs.setdefault("scale_wrt_gas", False)
        with forward_stack_kept():  # the recompute's early stop leaves ZeRO-3 hooks unbalanced (see there)
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Optional[Any] = None) -> None:
        """DeepSpeed's save into ``<path>.partial``, renamed to ``<path>`` once every rank wrote and rank 0 listed the
        files with their sizes (:mod:`lightning_ulysses.checkpoint.files`): a failed save never looks complete."""
        path = str(self.broadcast(str(filepath)))
        staging = staging_path(path)
        if self.is_global_zero:
            remove_stale_staging(path)
        self.barrier("ulysses_save_start")
        super().save_checkpoint(checkpoint, staging, storage_options)
        save_rng_state(staging, self.global_rank)
        self.barrier("ulysses_save_written")
        if self.is_global_zero:
            write_manifest(staging, self._saved_layout())
            publish(staging, path)
        self.barrier("ulysses_save_published")
        if self.local_rank == 0 and os.path.isdir(staging):  # a node-local disk: each node's own files
            publish(staging, path)
        self.barrier("ulysses_save_done")

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Check the checkpoint is complete, then load it as DeepSpeed saved it, or converted to DeepSpeed's universal
        format when it was saved at another world size or ZeRO-3 vs ZeRO-1/2 (:mod:`lightning_ulysses.checkpoint`)."""
        if self.load_full_weights and self.zero_stage_3:
            return super().load_checkpoint(checkpoint_path, weights_only)
        path = str(self.broadcast(str(checkpoint_path)))
        self._on_rank_zero(verify_checkpoint, path)
        saved, current = read_layout(path), self._saved_layout()
        try:
            reshard = needs_resharding(saved, current)
        except CheckpointError as exc:
            raise_once(exc)
        # each rank continues its own random stream (dropout), restored when the resumed training loop starts
        self._rng_checkpoint = path if saved.world_size == current.world_size else None
        if not reshard:
            return super().load_checkpoint(path, weights_only)
        rank_zero_info(f"lightning_ulysses: resharding the checkpoint from {saved.describe()} to {current.describe()}")
        tag = self._on_rank_zero(universal_tag, path)
        from lightning.pytorch.trainer.states import TrainerFn

        assert self.lightning_module is not None
        with universal_loading(self.deepspeed_engine):
            _, client_state = self.deepspeed_engine.load_checkpoint(
                path, tag=tag, load_optimizer_states=self.lightning_module.trainer.state.fn == TrainerFn.FITTING,
                load_lr_scheduler_states=False, load_module_strict=self.lightning_module.strict_loading,
            )
        return client_state

    def _restore_rng_state(self) -> None:
        if self._rng_checkpoint is not None:
            load_rng_state(self._rng_checkpoint, self.global_rank)
            self._rng_checkpoint = None

    def _saved_layout(self) -> SavedLayout:
        stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        name, state = optimizer_record(self.optimizers[0] if self.optimizers else None)
        return SavedLayout(self.world_size, stage, self.layout.sp if self.layout is not None else None,
                           optimizer=name, optimizer_state=state)

    def _on_rank_zero(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on rank 0 (file work on a shared checkpoint); its result, or its error, on every rank."""
        outcome: Any = None
        if self.is_global_zero:
            try:
                outcome = ("ok", fn(*args))
            except Exception as exc:  # reported below on rank 0, the others stop quietly
                outcome = ("error", exc)
        outcome = self.broadcast(outcome)
        if outcome[0] == "error":
            raise_once(outcome[1])
        return outcome[1]

    @override
    def teardown(self) -> None:
        self._hf_zero3.disable()
        use_mpu(None)
        # what setup applied comes off: the user's model is handed back as the plain HF model (its own classes and
        # forward, no attention handler), for generation, evaluation or another Trainer after fit
        hf_model = find_hf_model(self.lightning_module) if self.lightning_module is not None else None
        if hf_model is not None:
            remove_tricks(hf_model, self._applied_tricks)
        for model in find_hf_models(self.lightning_module) if self.lightning_module is not None else []:
            if model is not hf_model:
                remove_tricks(model, self._companion_tricks)
            remove_ulysses(sp_target(model))
            remove_multimodal(model)
        self._vlm = None
        self._applied_tricks = []
        self._companion_tricks = []
        set_step_context(None)  # the last batch's facts must not reach forwards run after fit
        # the engine (fp32 master weights, optimizer moments: ~30 GiB for 4 layers of an 8B model with AdamW) is freed
        # once the user drops the trainer and module, not kept for the rest of the process by DeepSpeed's globals and
        # hooks; the model still runs forward, and save_checkpoint still reads the optimizer while the trainer lives
        if self.model is not None and hasattr(self.model, "optimizer"):
            release_engine(self.model)
        # Lightning's Strategy.teardown copies the optimizer state and the module to host memory to free
        # the GPU. Under DeepSpeed that state is the engine's (partitioned) optimizer state: the copy is a
        # host-memory spike at the end of fit that nothing reads (measured: +30 GiB per rank, 8B model,
        # AdamW, 2 H200) and can exhaust host RAM for large models. Skip those two steps, keep the rest.
        optimizers, self.optimizers = self.optimizers, []
        module = self.lightning_module
        if module is not None:
            module.cpu = lambda: module  # type: ignore[method-assign]  # instance shadow, removed below
        try:
            super().teardown()
        finally:
            if module is not None:
                del module.cpu
            self.optimizers = optimizers

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """The names of :data:`lightning_ulysses.STRATEGY_NAMES` with this class (importing the package registers
        them already, with a factory that imports this module when a Trainer asks)."""
        from lightning_ulysses import STRATEGY_NAMES

        for name, (description, init_params) in STRATEGY_NAMES.items():
            strategy_registry.register(name, cls, description=description, override=True, **init_params)


def _embedding_rows(hf_model: Optional[torch.nn.Module], trainer: Any) -> Optional[int]:
    """Rows of the model's input embedding; warns once when the data module's tokenizer is larger (its extra ids
    would be refused in the first batch that holds one)."""
    embedding = hf_model.get_input_embeddings() if hf_model is not None else None
    rows = getattr(embedding, "num_embeddings", None)
    tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    if rows is not None and tokenizer is not None and len(tokenizer) > rows:
        rank_zero_warn(
            f"lightning_ulysses: the data module's tokenizer has {len(tokenizer)} tokens but the model's embedding "
            f"{rows} rows; a batch with an id >= {rows} is refused. Use the model's own tokenizer, or build the model "
            "with a vocab_size that covers the tokenizer (YAML: model.model.vocab_size)."
        )
    return rows


def _flag_view(kind: type[MemoryTrick]) -> property:
    def get(self: UlyssesDeepSpeedStrategy) -> Optional[MemoryTrick]:
        plan = self.memory_tricks or self.memory_plan.resolve(self.layout.sp_enabled if self.layout else True)
        return next((t for t in plan if type(t) is kind), None)

    return property(get, doc=f"The {kind.__name__} trick in this strategy's plan, or None (read-only view of the plan).")


# `strategy.tiled_mlp` etc.: read-only views of the one plan (before setup() the SP-only defaults count as on)
for _kind in TRICKS:
    if _kind.flag:
        setattr(UlyssesDeepSpeedStrategy, _kind.flag, _flag_view(_kind))


__all__ = ["UlyssesDeepSpeedStrategy"]
