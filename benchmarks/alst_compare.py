"""Side by side: our Trainer path vs DeepSpeed's raw ALST path, same model, ZeRO config and data.

One process group per (path, sequence length), launched by torchrun:

    torchrun --nproc_per_node=4 benchmarks/alst_compare.py --path ours --preset llama3-8b --seq 65536 --out ours_64k.json
    torchrun --nproc_per_node=4 benchmarks/alst_compare.py --path alst --preset llama3-8b --seq 65536 --out alst_64k.json
    python benchmarks/alst_compare.py --report ours_64k.json alst_64k.json ...

* ``ours``: ``lightning.Trainer`` + ``UlyssesDeepSpeedStrategy`` + ``CausalLMModule`` (the user path): ZeRO-3,
  bf16, sdpa, non-reentrant checkpointing, our tiled loss (torch tiles, like-for-like with the reference).
* ``alst``: what the DeepSpeed ALST tutorial / ArcticTraining do: ``UlyssesSPAttentionHF.register_with_transformers``,
  ``deepspeed.initialize(mpu=...)``, ``UlyssesSPDataLoaderAdapter``, ``TiledFusedLogitsLoss`` and the
  all-gather-weighted SP loss, same checkpointing and optimizer (fused torch AdamW on CUDA). The rest of
  DeepSpeed 0.19.8's released memory stack is there for trick-for-trick memory comparisons: ``--tiled-mlp``
  (its ``TiledMLP`` on every decoder MLP) and ``--offload`` (its ``checkpoint_in_cpu`` activation offload via
  ``deepspeed.checkpointing``); the same flags switch on our own implementations on the ``ours`` path.

``--runs JSON`` (``ours`` only): several configurations in one launch, each a list of arguments added to the
command's own (its own ``--label``/``--out``), in the same processes and process group; host RSS is then the
running maximum, and a run's peak GPU memory is counted above what is still allocated when it starts
(``retained_gib``: what earlier runs left behind). The CPU test uses it to save process start-ups.

Each run: ``--warmup`` untimed steps, then ``--steps`` timed steps; median step time, tokens/s, model TFLOPS/GPU
(6·N·S + 6·L·S²·H, N without the input embedding), peak GPU memory (max over ranks), peak host RSS.
An OOM is caught and reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

PRESETS = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "qwen3-4b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "tiny": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def hf_config(preset: str, seq: int, layers: int | None):
    from transformers import AutoConfig

    spec = dict(PRESETS[preset])
    if layers:
        spec["num_hidden_layers"] = layers
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, max_position_embeddings=max(seq, 8192), tie_word_embeddings=False, **spec)


def ds_config(zero_stage: int, bf16: bool, zero_options: Optional[dict] = None) -> dict:
    """The one DeepSpeed config of both paths; ``zero_options`` (``--zero-option``) go into
    ``zero_optimization``.

    ZeRO-3's trace options differ between the paths unless given here: our strategy sets
    ``stage3_prefetch_bucket_size`` and ``stage3_max_reuse_distance`` to 0 where the config does not name
    them (``lightning_ulysses.memory.zero_config``; ``--zero3-prefetch`` keeps DeepSpeed's defaults), and the
    reference path never completes a trace (it calls the inner model, as ArcticTraining does), so both
    release each layer's parameters after use."""
    zero = {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True}
    zero.update(zero_options or {})
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
    }


def zero_options(pairs: list[str]) -> dict:
    """``--zero-option KEY=VALUE`` pairs as a dict; values parsed as JSON where they can be (numbers, bools)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--zero-option takes KEY=VALUE (a zero_optimization field), got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def optimizer_factory(params):
    return torch.optim.AdamW(params, lr=1e-5, fused=torch.cuda.is_available())


def random_tokens(seq: int, vocab: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (seq,), generator=g) for _ in range(n)]


def rss_note(phase: str) -> None:
    """Current and peak host RSS of this rank at a phase (``--rss-trace``; rank 0 prints)."""
    if os.environ.get("ALST_COMPARE_RSS_TRACE") != "1" or os.environ.get("RANK", "0") != "0":
        return
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    gib = {k: int(v.split()[0]) / 2**20 for k, v in fields.items()}
    print(f"rss[{phase}] now {gib['VmRSS']:.2f} GiB, peak {gib['VmHWM']:.2f} GiB", flush=True)


def start_rss_sampler() -> None:
    """``--rss-trace``: sample host RSS every 20 ms on rank 0 and print, at exit, the Python stack of the
    main thread at the moment of the highest sample (where a transient host allocation happens)."""
    if os.environ.get("ALST_COMPARE_RSS_TRACE") != "1" or os.environ.get("RANK", "0") != "0":
        return
    import atexit
    import sys
    import threading
    import traceback

    page = os.sysconf("SC_PAGE_SIZE")
    main_id = threading.main_thread().ident
    best = {"rss": 0, "stack": []}

    def sample() -> None:
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            if rss > best["rss"] + 2**26:  # a new high by > 64 MiB: remember where the main thread is
                frame = sys._current_frames().get(main_id)
                best["rss"] = rss
                best["stack"] = traceback.format_stack(frame)[-14:] if frame is not None else []
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()

    def dump() -> None:
        print(f"rss-sampler: highest sample {best['rss'] / 2**30:.2f} GiB, main thread was at:", flush=True)
        print("".join(best["stack"]), flush=True)

    atexit.register(dump)


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gathered_zero3_params(model: Optional[torch.nn.Module]) -> Optional[int]:
    """Elements of ZeRO-3 partitioned (not persistent) parameters gathered right now; None without ZeRO-3.
    At the end of forward this is what ZeRO-3's prefetch holds into backward (see :func:`ds_config`)."""
    if model is None or not any(hasattr(p, "ds_status") for p in model.parameters()):
        return None
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel for p in model.parameters()
               if p.ds_status == ZeroParamStatus.AVAILABLE and not getattr(p, "ds_persist", False))


class StepMemoryProfile:
    """``--memory-profile``: where the first measured step's GPU memory goes, on rank 0, written to
    ``<out>.memory.json`` and printed: the peak and the end-of-phase allocation of forward (with the loss),
    backward and the optimizer step, and the allocator's trace of each summarised at the phase's peak by
    allocation site (:func:`benchmarks.memory_peak.peak_summary`). Where two paths'
    peaks differ, this says in which phase and which tensors (the issue's profile requirement).

    Backward is traced without stacks (its blocks are known by size): recording Python stacks there makes
    torch 2.11 lose the exception that stops a checkpoint's recompute early inside ZeRO-3's linear Function
    (``SystemError ... returned NULL``), and early stop must stay on under ZeRO-3 (see
    ``model_utils.checkpoint_kwargs``). Peak counters are reset
    per phase, so a profiled run's ``peak_gib`` is the profiled and later steps' only."""

    def __init__(self, enabled: bool, out: str) -> None:
        # on CPU only the phases' order is recorded (no allocator to trace): the hook plumbing stays testable
        self.enabled = enabled and os.environ.get("RANK", "0") == "0"
        self.cuda = torch.cuda.is_available()
        self.out = str(Path(out).with_suffix("")) + ".memory.json"
        self.phases: list[dict] = []
        self.active = False
        self.model: Optional[torch.nn.Module] = None  # the ZeRO-3 model, for gathered_zero3_params

    def _record(self, on: bool, stacks: bool = True) -> Optional[list[dict]]:
        if not self.cuda:
            return [] if not on else None
        if on:
            if stacks:
                torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
            else:  # events only, no tracebacks: the backward's blocks are known by size alone
                torch.cuda.memory._record_memory_history(max_entries=4_000_000, context=None)
            return None
        trace = torch.cuda.memory._snapshot()["device_traces"][0]
        torch.cuda.memory._record_memory_history(enabled=None)
        return trace

    def start(self) -> None:
        if not self.enabled:
            return
        self.active = True
        self.before = None
        if self.cuda:
            torch.cuda.synchronize()
            self.before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self._record(True)

    def phase(self, name: str) -> None:
        """End of phase ``name`` ("forward", "backward" or "optimizer step") of the profiled step."""
        if not self.active:
            return
        from benchmarks.memory_peak import peak_summary

        row: dict = {"phase": name, "peak": None, "end": None, "gathered_params": gathered_zero3_params(self.model)}
        if self.cuda:
            torch.cuda.synchronize()
            row.update(peak=torch.cuda.max_memory_allocated(), end=torch.cuda.memory_allocated())
        row.update(peak_summary(self._record(False), top=12))
        self.phases.append(row)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        if name != "optimizer step":
            self._record(True, stacks=name != "forward")  # backward (recorded from the end of forward): no stacks
        if name == "optimizer step":
            self.active = self.enabled = False
            self.report()

    def report(self) -> None:
        Path(self.out).write_text(json.dumps({"allocated_before": self.before, "phases": self.phases}, indent=1))
        if not self.cuda:
            print("--memory-profile: no CUDA device, only the phases' order was recorded", flush=True)
            return
        gib = lambda b: b / 2**30  # noqa: E731
        print(f"memory profile (rank 0), allocated before the step: {gib(self.before):.2f} GiB")
        print("| phase | peak GiB | allocated at its end GiB | ZeRO-3 parameters gathered at its end |\n|---|---|---|---|")
        for r in self.phases:
            print(f"| {r['phase']} | {gib(r['peak']):.2f} | {gib(r['end']):.2f} | {r['gathered_params'] or 0:,} |")
        for r in self.phases:
            if "rows" in r:
                print(f"{r['phase']}: live at its peak, allocated within it (+{gib(r['peak_in_step']):.2f} GiB):")
                for row in r["rows"]:
                    print(f"  {gib(row['bytes']):7.3f} GiB  {row['count']:5d}  {row['site']}")
                sizes = sorted(r["unattributed_sizes"].items(), key=lambda kv: -int(kv[0]) * kv[1])[:10]
                print("  blocks without a library frame, MiB x count: "
                      + ", ".join(f"{int(k) / 2**20:.1f} x {v}" for k, v in sizes))
                print("  peak allocation made at: " + " <- ".join(r["at_peak"][:6]))
        print("", flush=True)


# ----------------------------------------------------------------------------------------------- ours
def run_ours(args, cfg) -> list[float]:
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_ulysses  # noqa: F401
    from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy
    from lightning_ulysses.lightning.callbacks import SequenceThroughput

    dp = int(os.environ["WORLD_SIZE"]) // args.sp
    data = [{"input_ids": t} for t in random_tokens(args.seq, cfg.vocab_size, (args.warmup + args.steps) * dp)]
    if args.packed_docs > 1:  # K causal documents per row, told apart by position_ids that restart at 0
        doc = args.seq // args.packed_docs
        for sample in data:
            sample["position_ids"] = torch.arange(doc).repeat(args.packed_docs)
    lightning_ds_config = ds_config(args.zero_stage, True, zero_options(args.zero_option))
    del lightning_ds_config["gradient_accumulation_steps"]  # Lightning sets it from accumulate_grad_batches
    optimizer = optimizer_factory
    if args.cpu_optimizer:  # ZeRO-Offload: fp32 master weights + Adam state in host memory, DeepSpeed's CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        lightning_ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        optimizer = lambda params: DeepSpeedCPUAdam(params, lr=1e-5)  # noqa: E731
    timer = SequenceThroughput(warmup_steps=args.warmup)

    profile = StepMemoryProfile(args.memory_profile, args.out)

    class _RSS(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            rss_note("ours: strategy set up, engine initialised")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                profile.model = pl_module.model
                profile.start()

        def on_before_backward(self, trainer, pl_module, loss):
            profile.phase("forward")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # after backward, before engine.step
            profile.phase("backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            profile.phase("optimizer step")
            rss_note(f"ours: after step {batch_idx}")

    module = CausalLMModule(model=cfg, attn_implementation=args.attn, optimizer=optimizer, dtype="bfloat16")
    trainer = L.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=int(os.environ["WORLD_SIZE"]),
        precision="bf16-mixed", max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer, _RSS()],
        strategy=UlyssesDeepSpeedStrategy(
            sequence_parallel_size=args.sp, stage=args.zero_stage, tiled_loss=True, tiled_loss_impl=args.loss_impl,
            config=lightning_ds_config, gradient_checkpointing=True, checkpoint_policy=args.checkpoint_policy,
            save_attention_layers=args.save_attention_layers,
            activation_checkpoint_cpu_offload=args.offload,
            activation_checkpoint_cpu_offload_keep_layers=args.offload_keep_layers, tiled_mlp=args.tiled_mlp,
            memory_efficient_rmsnorm=args.rmsnorm, memory_efficient_swiglu=args.swiglu,
            memory_efficient_impl=args.kernel_impl,
            tiled_attention_backward=args.tiled_attention is not None,
            tiled_attention_tile_tokens=args.tiled_attention or None,
            context_parallel_mode=args.mode, ring_size=args.ring_size, ring_attention_backend=args.ring_backend,
            zero3_prefetch=args.zero3_prefetch,
        ),
    )
    strategy = trainer.strategy
    if os.environ.get("ALST_COMPARE_RSS_TRACE") == "1":
        build, init = module.configure_model, strategy._setup_model_and_optimizer

        def traced_build():
            build()
            rss_note("ours: configure_model done")

        def traced_init(*a, **k):
            rss_note("ours: before deepspeed.initialize")
            out = init(*a, **k)
            rss_note("ours: after deepspeed.initialize")
            return out

        module.configure_model, strategy._setup_model_and_optimizer = traced_build, traced_init
    rss_note("ours: before fit")
    trainer.fit(module, DataLoader(data, batch_size=1))
    return [m["throughput/step_s"] for m in timer.history[args.warmup:]]


# ----------------------------------------------------------------------------------------------- alst
def run_alst(args, cfg) -> list[float]:
    import types

    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import (
        TiledFusedLogitsLoss,
        UlyssesSPAttentionHF,
        UlyssesSPDataLoaderAdapter,
    )
    from deepspeed.utils import groups
    from transformers import AutoModelForCausalLM

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg._attn_implementation = "sdpa"
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=types.SimpleNamespace(config=cfg), core_attn_implementation="sdpa",
        sequence_parallel_size=args.sp, micro_batch_size=1, seq_length_is_variable=True,
    )
    config = ds_config(args.zero_stage, True, zero_options(args.zero_option))
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=args.zero_stage == 3):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.tiled_mlp:
        patched = _alst_tiled_mlp(model, args.zero_stage == 3)
        if os.environ.get("RANK", "0") == "0":
            print(f"alst: DeepSpeed TiledMLP on {patched} decoder MLPs", flush=True)
    if args.offload:
        if device.type != "cuda":
            # its blocking (non-CUDA) path copies the layer input "to CPU" (a no-op there), then empties the
            # input's storage, which is that same storage: the recompute would see an empty tensor
            raise SystemExit("--offload on the alst path needs CUDA: DeepSpeed's checkpoint_in_cpu cannot offload "
                             "from CPU to CPU (leave --offload off for CPU runs of the reference)")
        # DeepSpeed's own activation-checkpoint CPU offload: its checkpoint function with `checkpoint_in_cpu`
        # copies each checkpointed layer input to host memory (async engine on CUDA) and back for backward.
        deepspeed.checkpointing.configure(None, checkpoint_in_cpu=True)
        model._set_gradient_checkpointing(True, deepspeed.checkpointing.non_reentrant_checkpoint)
        if os.environ.get("RANK", "0") == "0":
            print("alst: DeepSpeed checkpoint_in_cpu activation offload on", flush=True)
    rss_note("alst: model built under zero.Init")
    engine, _, _, _ = deepspeed.initialize(config=config, model=model, model_parameters=model.parameters(),
                                           optimizer=optimizer_factory(model.parameters()), mpu=mpu)
    rss_note("alst: after deepspeed.initialize")
    sp_group, sp_world, sp_rank = (groups._get_sequence_parallel_group(), groups._get_sequence_parallel_world_size(),
                                   groups._get_sequence_parallel_rank())
    tokens = random_tokens(args.seq, cfg.vocab_size, (args.warmup + args.steps) * sp_world)
    samples = [{"input_ids": t[None], "position_ids": torch.arange(args.seq)[None], "labels": t[None].clone()}
               for t in tokens]
    dl = UlyssesSPDataLoaderAdapter(torch.utils.data.DataLoader(samples, batch_size=None), sp_rank=sp_rank,
                                    sp_group=sp_group, sp_world_size=sp_world, device=engine.device)
    unwrapped = engine.module
    vocab = cfg.vocab_size

    def loss_fn(self, x, y):
        logits = self.lm_head(x)
        return self.loss_function(logits=logits, labels=None, shift_labels=y, vocab_size=vocab)

    times = []
    profile = StepMemoryProfile(args.memory_profile, args.out)
    profile.model = unwrapped
    for step, batch in enumerate(dl):
        if step >= args.warmup + args.steps:
            break
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        if step == args.warmup:
            profile.start()
        cuda_sync()
        t0 = time.perf_counter()
        hidden = unwrapped.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        shift_labels = batch["shift_labels"]
        shards = max(1, math.ceil(shift_labels.numel() * vocab * 4 / 2**30))  # ~1 GiB fp32 logits per shard
        loss = TiledFusedLogitsLoss.apply(loss_fn, unwrapped, hidden, shift_labels, None, shards,
                                          [unwrapped.lm_head.weight], "mean")
        # the tutorial's differentiable token-weighted aggregation over the SP group
        losses = torch.distributed.nn.functional.all_gather(loss, group=sp_group)
        good = (shift_labels != -100).view(-1).sum()
        goods = torch.distributed.nn.functional.all_gather(good, group=sp_group)
        loss = sum(losses[r] * goods[r] for r in range(sp_world)) / max(sum(goods), 1)
        profile.phase("forward")
        engine.backward(loss)
        profile.phase("backward")
        engine.step()
        profile.phase("optimizer step")
        cuda_sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        rss_note(f"alst: after step {step}")
    dist.barrier()
    return times


def _alst_tiled_mlp(model, zero3: bool) -> int:
    """DeepSpeed's released ``TiledMLP`` on every decoder MLP, as its docstring and ArcticTraining apply it:
    ``ceil(seqlen / hidden)`` shards, agreed over all ranks (a rank with fewer shards would desynchronise
    ZeRO-3's parameter gathers), the MLP's weights passed as ``compute_params`` under ZeRO-3."""
    import types

    import deepspeed.comm as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def mlp_forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def tiled_forward(self, x):
        shards = torch.tensor(math.ceil(x.shape[1] / x.shape[2]), device=x.device)
        dist.all_reduce(shards, op=dist.ReduceOp.MAX)
        params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight] if zero3 else None
        return TiledMLP.apply(mlp_forward, self, x, int(shards.item()), params)

    patched = 0
    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(tiled_forward, layer.mlp)
        patched += 1
    return patched


# --------------------------------------------------------------------------------------------- driver
def run(args, last: bool = True) -> None:
    """One configuration; ``last``: tear the process group down afterwards (``--runs`` keeps it for the next)."""
    import torch.distributed as tdist

    # under --runs an earlier run's objects may still hold GPU memory (Lightning and DeepSpeed keep references):
    # this run's peak is counted above what is allocated when it starts
    gc.collect()
    retained = 0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        retained = torch.cuda.memory_allocated()
    cfg = hf_config(args.preset, args.seq, args.layers)
    result = {"path": args.label or args.path, "preset": args.preset, "layers": cfg.num_hidden_layers, "seq": args.seq, "sp": args.sp,
              "packed_docs": args.packed_docs, "attn": args.attn,
              "world": int(os.environ["WORLD_SIZE"]), "zero_stage": args.zero_stage,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    try:
        times = run_ours(args, cfg) if args.path == "ours" else run_alst(args, cfg)
        result["step_s"] = sorted(times)[len(times) // 2]
        result["all_step_s"] = times
    except torch.OutOfMemoryError as e:
        result["oom"] = repr(e)[:300]
    result["retained_gib"] = retained / 2**30
    peak = torch.tensor([(torch.cuda.max_memory_allocated() - retained) / 2**30 if torch.cuda.is_available() else 0.0,
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])
    if tdist.is_initialized():
        if torch.cuda.is_available():
            peak = peak.cuda()
        tdist.all_reduce(peak, op=tdist.ReduceOp.MAX)
    result["peak_gib"], result["host_rss_gib"] = float(peak[0]), float(peak[1])
    if "step_s" in result:
        from lightning_ulysses.models.flops import ModelDims, model_flops

        n_emb = cfg.vocab_size * cfg.hidden_size
        n_total = _param_count(cfg)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dims = ModelDims(n_total - n_emb, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim)
        dp = result["world"] // args.sp
        s = args.seq
        result["tokens_per_s"] = dp * s / result["step_s"]
        # causal attention FLOPs grow with each document's length squared: K documents of S/K -> S^2/K
        sum_sq = dp * s * s / args.packed_docs
        result["model_tflops_per_gpu"] = model_flops(dims, dp * s, sum_sq) / result["step_s"] / result["world"] / 1e12
        if args.peak_tflops:
            result["mfu"] = result["model_tflops_per_gpu"] / args.peak_tflops
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result), flush=True)
    if tdist.is_initialized():
        tdist.barrier()
        if last:
            tdist.destroy_process_group()


def _param_count(cfg) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def report(paths: list[str], plot: str | None) -> None:
    rows = [json.load(open(p)) for p in paths]
    rows.sort(key=lambda r: (r["seq"], r["path"]))
    print(f"{rows[0]['device']}, torch {rows[0]['torch']}, {rows[0]['preset']} ({rows[0]['layers']} layers), "
          f"ZeRO-{rows[0]['zero_stage']}, world {rows[0]['world']}")
    print("| seq | path | sp x dp | step s | tokens/s | tokens/s/GPU | model TFLOPS/GPU | MFU | peak GiB (max rank) | host RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        layout = f"{r['sp']} x {r['world'] // r['sp']}"
        if "oom" in r:
            print(f"| {r['seq']:,} | {r['path']} | {layout} | OOM | | | | | {r['peak_gib']:.1f} | {r['host_rss_gib']:.1f} |")
            continue
        mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else ""
        print(f"| {r['seq']:,} | {r['path']} | {layout} | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / r['world']:,.0f} | {r['model_tflops_per_gpu']:.0f} | "
              f"{mfu} | {r['peak_gib']:.1f} | "
              f"{r['host_rss_gib']:.1f} |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for path in sorted({r["path"] for r in rows}):
            pts = [r for r in rows if r["path"] == path and "step_s" in r]
            a1.plot([r["seq"] for r in pts], [r["tokens_per_s"] for r in pts], "o-", label=path)
            a2.plot([r["seq"] for r in pts], [r["peak_gib"] for r in pts], "o-", label=path)
        for ax, title in ((a1, "tokens/s"), (a2, "peak GPU memory (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_title(title)
            ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--path", choices=["ours", "alst"])
    p.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--sp", type=int, default=4)
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("--zero-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a zero_optimization field for both paths, e.g. stage3_max_reuse_distance=0 (repeatable; "
                        "see ds_config for why)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="result.json")
    p.add_argument("--rss-trace", action="store_true", help="print host RSS at setup phases (rank 0)")
    p.add_argument("--label", default=None, help="name of this run in the report (default: --path)")
    p.add_argument("--checkpoint-policy", default="full", choices=["full", "save_attention"], help="ours only")
    p.add_argument("--save-attention-layers", type=int, default=None,
                   help="ours, with --checkpoint-policy save_attention: only this many layers keep attention outputs")
    p.add_argument("--offload", action="store_true",
                   help="activation-checkpoint CPU offload (ours: lightning_ulysses.memory.offload; alst: DeepSpeed's "
                        "checkpoint_in_cpu through deepspeed.checkpointing)")
    p.add_argument("--offload-keep-layers", type=int, default=0,
                   help="ours, with --offload: the first this many layer inputs stay on the GPU (host RAM bound runs)")
    p.add_argument("--tiled-mlp", action="store_true",
                   help="tiled MLP (ours: lightning_ulysses.memory.tiled_mlp; alst: DeepSpeed's TiledMLP)")
    p.add_argument("--rmsnorm", action="store_true", help="ours: memory-efficient RMSNorm")
    p.add_argument("--swiglu", action="store_true", help="ours: memory-efficient SwiGLU")
    p.add_argument("--tiled-attention", type=int, nargs="?", const=0, default=None, metavar="TILE_TOKENS",
                   help="ours: tiled attention backward (optional tile tokens; default 16384)")
    p.add_argument("--kernel-impl", default="auto", choices=["auto", "torch", "liger"],
                   help="ours: kernels of --rmsnorm/--swiglu (auto: Liger on CUDA when installed)")
    p.add_argument("--loss-impl", default="torch", choices=["auto", "torch", "liger"],
                   help="ours: tiled loss kernel (torch by default, like for like with the reference's tiles)")
    p.add_argument("--cpu-optimizer", action="store_true",
                   help="ours: ZeRO-3 optimizer offload to CPU with DeepSpeedCPUAdam (single-GPU max-length runs)")
    p.add_argument("--mode", default="auto", help="ours: context_parallel_mode (auto|hybrid|ulysses_only|ring_only)")
    p.add_argument("--ring-size", type=int, default=None, help="ours: ring degree (sp = ulysses x ring)")
    p.add_argument("--ring-backend", default="auto", help="ours: ring attention block kernel")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 matmul peak per GPU for MFU, ideally measured on the same machine (H200: 786)")
    p.add_argument("--zero3-prefetch", action="store_true",
                   help="ours: keep DeepSpeed's ZeRO-3 trace prefetch/reuse (the strategy's zero3_prefetch=True)")
    p.add_argument("--attn", default="sdpa", help="ours: the model's attn_implementation (flash_attention_2: the "
                   "flash-attn package, varlen kernel for packed rows)")
    p.add_argument("--packed-docs", type=int, default=1, metavar="K",
                   help="ours: pack K equal causal documents per row (position_ids restart); FLOPs count S^2/K")
    p.add_argument("--memory-profile", action="store_true",
                   help="record the allocator over the first measured step (rank 0, CUDA) and write where the "
                        "peak's memory lives to <out>.memory.json (slows that step)")
    p.add_argument("--report", nargs="+")
    p.add_argument("--plot", default=None)
    p.add_argument("--runs", default=None, metavar="JSON",
                   help="--path ours only: a JSON list of argument lists, each run in turn in the same processes")
    args = p.parse_args()
    if args.runs:
        runs = [p.parse_args(sys.argv[1:] + list(extra)) for extra in json.loads(args.runs)]
        if any(r.path != "ours" for r in runs):
            raise SystemExit("--runs chains --path ours runs only (the alst path registers global DeepSpeed state)")
        for i, r in enumerate(runs):
            check_and_run(r, last=i == len(runs) - 1)
        return
    if args.report:
        report(args.report, args.plot)
    else:
        check_and_run(args)


def check_and_run(args, last: bool = True) -> None:
    if args.path == "alst" and (args.packed_docs > 1 or args.zero3_prefetch or args.attn != "sdpa"):
        raise SystemExit("--packed-docs, --zero3-prefetch and --attn are options of --path ours")
    if args.packed_docs < 1 or args.seq % args.packed_docs:
        raise SystemExit(f"--packed-docs must divide --seq ({args.seq}) into equal documents, got {args.packed_docs}")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.rss_trace:
        os.environ["ALST_COMPARE_RSS_TRACE"] = "1"
        start_rss_sampler()
    run(args, last)


if __name__ == "__main__":
    main()
