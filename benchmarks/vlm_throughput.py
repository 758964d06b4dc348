"""A vision-language model on one long video, one GPU: tokens/s, peak memory, and the vision tower's share of a step.

Qwen2.5-VL-7B shape (vision tower whole: 32 blocks of width 1280, window attention, patch merger to 3584; language
model of hidden 3584, MLP 18944, 28 q / 4 kv heads, vocab 152064) with the language model cut to ``--layers``, random
init, bf16, ZeRO-3, fused AdamW, ``memory="auto"`` (or ``--plan NAME``, one of the candidates). Each row is one video
of ``--frame`` x ``--frame`` pixels (``(frame/28)^2`` tokens per 2-frame group) between a short text prompt and a
text answer, ``--seq-len`` tokens in all; the labels are the text after the video (the prompt and the video tokens
are masked, as ``MultimodalSFTDataModule`` masks a user turn).

Modes: ``trained`` (the tower trains, with gradient checkpointing like the decoder) and ``frozen``
(``freeze_vision_tower=True``: its forward runs without autograd). The tower's forward is timed inside the step
(CUDA-synchronised hooks on the tower); its backward share is the trained step minus the frozen one at the same
length. One GPU is sp=1: the tower encodes every frame; at sp=N each rank encodes 1/N of the frame groups
(:func:`lightning_ulysses.parallel.vision.split_units`), which this script cannot measure.

    python benchmarks/vlm_throughput.py --layers 4 --seq-lens 65536 131072 --modes trained frozen
    python benchmarks/vlm_throughput.py --tiny --seq-lens 2048   # CPU smoke run
    python benchmarks/vlm_throughput.py --report                  # the table of every run so far
    python benchmarks/vlm_throughput.py --seq-lens 131072 --predict-sp 1 2 4 8   # split vs replicated, predicted
    python benchmarks/vlm_throughput.py --block-saved-bytes        # one tower block's saved bytes per patch (CPU)
    python benchmarks/vlm_throughput.py --tower-attention          # the tower alone: per-window vs batched attention
    python benchmarks/vlm_throughput.py --seq-lens 65536 --modes frozen --memory-profile   # what is live at the peak
    python benchmarks/vlm_throughput.py --seq-lens 65536 --modes frozen --tower-tile 16384   # smaller tower calls
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

import torch

GiB = 2**30
IMG, VID, VS, VE = 151655, 151656, 151652, 151653
QWEN2_5_VL_7B = {
    "model_type": "qwen2_5_vl", "image_token_id": IMG, "video_token_id": VID, "vision_start_token_id": VS,
    "vision_end_token_id": VE, "tie_word_embeddings": False,
    "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 1 << 20,
                    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "in_channels": 3,
                      "hidden_act": "silu"},
}
TINY = {  # the same structure at toy width (CPU smoke run)
    **QWEN2_5_VL_7B, "image_token_id": 120, "video_token_id": 121, "vision_start_token_id": 122,
    "vision_end_token_id": 123,
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "vocab_size": 128, "max_position_embeddings": 1 << 16,
                    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "bos_token_id": 1, "eos_token_id": 2},
    "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [1], "in_channels": 3},
}


def video_row(spec: dict, seq: int, frame: int, prompt: int = 256) -> dict:
    """One row: ``prompt`` text tokens, <vision_start>, the video's tokens, <vision_end>, answer text to ``seq``."""
    vc = spec["vision_config"]
    side = frame // vc["patch_size"]  # patches per side
    per_group = side * side // vc["spatial_merge_size"] ** 2  # tokens per temporal group of 2 frames
    groups = (seq - prompt - 2 - 64) // per_group  # at least 64 answer tokens
    vocab = spec["text_config"]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    answer = seq - prompt - 2 - groups * per_group
    top = min([vocab] + [spec[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                           "vision_end_token_id")])  # text ids below every special one
    text = lambda n: torch.randint(3, top, (n,), generator=g)  # noqa: E731
    ids = torch.cat([text(prompt), torch.tensor([spec["vision_start_token_id"]]),
                     torch.full((groups * per_group,), spec["video_token_id"]),
                     torch.tensor([spec["vision_end_token_id"]]), text(answer)]).unsqueeze(0)
    labels = ids.clone()
    labels[:, : prompt + 2 + groups * per_group] = -100
    patch = vc["in_channels"] * vc["temporal_patch_size"] * vc["patch_size"] ** 2
    return {"input_ids": ids, "labels": labels,
            "pixel_values_videos": torch.randn(groups * side * side, patch, generator=g),
            "video_grid_thw": torch.tensor([[groups, side, side]]), "groups": groups, "patches": groups * side * side,
            "video_tokens": groups * per_group}


class TowerTimer:
    """Wall time of the tower's forward inside the step (synchronised before and after: ~no overlap to lose, the
    tower's output is needed before the decoder runs). The tower is called once per tile of units
    (``tower_tile_patches``: 8 calls per step at 32K tokens of 448 x 448 video when it trains, 2 when frozen), so a
    step's time is the sum of its calls (:meth:`step_done` closes a step)."""

    def __init__(self, tower: torch.nn.Module, cuda: bool) -> None:
        self.cuda, self.times, self._t0, self.steps = cuda, [], 0.0, []
        self.handles = [tower.register_forward_pre_hook(self._start), tower.register_forward_hook(self._stop)]

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _start(self, *_) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t0)

    def step_done(self) -> None:
        self.steps.append(sum(self.times))
        self.times = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def time_profile(step: int, cuda: bool) -> Any:
    """A callback profiling training step ``step`` (see ``TimeProfile``); its ``.tables`` after the step."""
    import lightning.pytorch as pl

    class TimeProfile(pl.Callback):
        """``torch.profiler`` over training step ``step``: the operators with the most self device time and the most
        self host time (a step far longer than its kernels is bound by the host: launches, Python loops, syncs)."""

        def __init__(self, step: int, cuda: bool) -> None:
            self.step, self.cuda, self.tables, self.prof = step, cuda, {}, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == self.step:
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == self.step and self.prof is not None:
                if self.cuda:
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                ka = self.prof.key_averages()
                if self.cuda:
                    self.tables["device"] = ka.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60)
                self.tables["host"] = ka.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60)
                self.prof = None

    return TimeProfile(step, cuda)


def fit(mode: str, seq: int, args) -> dict:
    import lightning.pytorch as pl

    from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy
    from lightning_ulysses.lightning.callbacks import SequenceThroughput
    from lightning_ulysses.memory.candidates import CANDIDATES
    from lightning_ulysses.models.multimodal import vlm_family

    import lightning_ulysses.models.multimodal as mm

    if args.tower_tile:  # the tile of this run's tower, trained or frozen
        mm.TOWER_TILE_PATCHES = mm.FROZEN_TOWER_TILE_PATCHES = args.tower_tile
    tile = mm.tower_tile_patches(mode == "trained")
    if args.no_tower_leaves:  # ZeRO-3 hooks every sub-module of a frozen tower's blocks, as before leaf blocks
        import lightning_ulysses.lightning.strategy as strategy_module

        strategy_module.zero3_leaf_tower_blocks = lambda model: 0
    spec = TINY if args.tiny else QWEN2_5_VL_7B
    spec = {**spec, "text_config": {**spec["text_config"], "num_hidden_layers": args.layers}}
    cuda = torch.cuda.is_available()
    row = video_row(spec, seq, args.frame)
    facts = {k: row.pop(k) for k in ("groups", "patches", "video_tokens")}
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-6, fused=cuda)  # noqa: E731
    module = CausalLMModule(spec, attn_implementation="sdpa", optimizer=optimizer,
                            freeze_vision_tower=mode == "frozen")
    plan = {"memory": "auto", "max_seq_len": seq} if args.plan == "auto" else CANDIDATES[args.plan]
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=1, stage=3, pad_to_multiple_of=64, **plan)
    throughput = SequenceThroughput(warmup_steps=1)
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
                         strategy=strategy, max_steps=args.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[throughput])
    loader = torch.utils.data.DataLoader([row] * args.steps, batch_size=None)
    timer = None

    phases: list[dict[str, float]] = []

    class _Attach(pl.Callback):
        """The tower's timer, and each step's phases (synchronised): forward (loss included), backward, the rest
        (optimizer step, ZeRO-3's gradient partitioning)."""

        def on_train_start(self, trainer, pl_module) -> None:
            nonlocal timer
            inner = pl_module.model
            timer = TowerTimer(vlm_family(inner).tower(inner), cuda)

        def _mark(self, name: str) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t[name] = time.perf_counter()

        def on_train_batch_start(self, *_) -> None:
            self.t: dict[str, float] = {}
            self._mark("start")

        def on_before_backward(self, *_) -> None:
            self._mark("backward")

        def on_after_backward(self, *_) -> None:
            self._mark("rest")

        def on_train_batch_end(self, *_) -> None:
            self._mark("end")
            t = self.t
            timer.step_done()
            phases.append({"forward_s": t["backward"] - t["start"], "backward_s": t["rest"] - t["backward"],
                           "rest_s": t["end"] - t["rest"], "tower_forward_s": timer.steps[-1]})
            # as it happens: a run stopped by a time limit still tells where its steps went
            print(f"step {len(phases)}: " + ", ".join(f"{k} {v:.2f}" for k, v in phases[-1].items()), flush=True)

    trainer.callbacks.append(_Attach())
    profile = None
    if args.memory_profile and cuda:  # what is live at the last step's peak, by allocation site
        from benchmarks.memory_peak import peak_profile

        profile = peak_profile(args.steps - 1)
        trainer.callbacks.append(profile)
    timing = None
    if args.time_profile:  # where the last step's time goes: kernels (GPU) and operators (host), by self time
        timing = time_profile(args.steps - 1, cuda)
        trainer.callbacks.append(timing)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, loader)
    steady = throughput.history[1:] or throughput.history
    step_s = sorted(m["throughput/step_s"] for m in steady)[len(steady) // 2]
    tower_steps = timer.steps[1:] or timer.steps  # the first step warms up (as SequenceThroughput's warm-up step)
    tower_fwd = sorted(tower_steps)[len(tower_steps) // 2]
    timer.remove()
    estimate = getattr(strategy, "memory_estimate", None)
    result = {"mode": mode, "seq": seq, "layers": args.layers, **facts, "tower_tile": tile,
              "tower_leaves": mode == "frozen" and not args.no_tower_leaves, "step_s": step_s, "tokens_per_s": seq / step_s,
              **(phases[-1] if phases else {}), "tower_forward_s": tower_fwd,
              "vision_tflops": sorted(m["throughput/vision_tflops_per_gpu"] for m in steady)[len(steady) // 2],
              "model_tflops": sorted(m["throughput/model_tflops_per_gpu"] for m in steady)[len(steady) // 2],
              "peak_gib": max(m.get("memory/peak_allocated_gib", 0.0) for m in steady),
              "plan": estimate.name if estimate is not None else args.plan,
              "predicted_gib": estimate.gpu_peak_gib if estimate is not None else None}
    if cuda:  # a retry (cache flushed, then cudaMalloc again) means the step ran at the memory limit: slow, near OOM
        stats = torch.cuda.memory_stats()
        result.update(alloc_retries=stats.get("num_alloc_retries", 0),
                      reserved_gib=torch.cuda.max_memory_reserved() / GiB)
    if profile is not None:
        result["profile"] = profile.summary
    if timing is not None:
        result["time_profile"] = timing.tables
    del trainer, module
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def report(runs: list[dict], device: str, args) -> None:
    frozen = {r["seq"]: r for r in runs if r["mode"] == "frozen" and "step_s" in r}
    print(f"\n{device}, Qwen2.5-VL-7B shape, {args.layers} LM layers, full tower, ZeRO-3 bf16, one "
          f"{args.frame}x{args.frame} video per row")
    print("| tower | tokens | video tokens (frames) | plan | tower tile | tokens/s | step s | tower fwd s | tower share | "
          "vision TFLOPS | LM TFLOPS | peak GiB | predicted GiB | allocator retries |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if "step_s" not in r:
            print(f"| {r['mode']} | {r['seq']:,} | | {r.get('plan', '')} | | {r['error']} | | | | | | | | |")
            continue
        share = r["tower_forward_s"]
        if r["mode"] == "trained" and r["seq"] in frozen:  # + its backward (and recompute): trained - frozen step
            share += r["step_s"] - frozen[r["seq"]]["step_s"]
        pred = f"{r['predicted_gib']:.2f}" if r["predicted_gib"] is not None else ""
        leaves = ", leaf blocks" if r.get("tower_leaves") else ""
        print(f"| {r['mode']} | {r['seq']:,} | {r['video_tokens']:,} ({2 * r['groups']}) | {r['plan']} "
              f"| {r.get('tower_tile', 16384):,}{leaves} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {r['tower_forward_s']:.2f} | {share / r['step_s']:.0%} "
              f"| {r['vision_tflops']:.0f} | {r['model_tflops']:.0f} | {r['peak_gib']:.2f} | {pred} "
              f"| {r.get('alloc_retries', '')} |")


def predict(args) -> None:
    """The tower per rank at ``sp`` ranks per sequence, its units split (what the strategy does) vs replicated (every
    rank encoding every frame, as a plain VLM under SP would): patches, activation memory and forward+backward FLOPs,
    from :func:`lightning_ulysses.memory.auto.vision_bytes` and the tower's parameter count. No GPU needed."""
    from dataclasses import replace

    from transformers import AutoConfig

    from lightning_ulysses.memory.auto import vision_bytes, workload_for_run

    spec = dict(TINY if args.tiny else QWEN2_5_VL_7B)
    spec["text_config"] = {**spec["text_config"], "num_hidden_layers": args.layers}
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    print("| tokens | sp | tower | patches per rank | tower activations per rank GiB | tower TFLOP per rank |")
    print("|---|---|---|---|---|---|")
    for seq in args.seq_lens:
        w = workload_for_run(config, seq, world_size=max(args.predict_sp), sequence_parallel_size=1)
        video = video_row(spec, seq, args.frame)["video_tokens"]
        for sp in args.predict_sp:
            for how, ranks in (("split", sp), ("replicated", 1)):
                if sp == 1 and how == "replicated":
                    continue
                v = replace(w, sp=ranks, vision_tokens=video)
                kept, block = vision_bytes(v, checkpointing=True)
                patches = -(-video // ranks) * v.vision.patches_per_token
                flops = 4 * 2.0 * v.vision.n_params * patches  # forward, recompute, backward (2x)
                print(f"| {seq:,} | {sp} | {how} | {patches:,} | {(kept + block) / 2**30:.2f} | {flops / 1e12:.0f} |")


def block_saved_bytes(args) -> None:
    """Bytes autograd saves per patch in one tower block (bf16; distinct storages), a windowed and a full-attention
    block of the Qwen2.5-VL-7B tower on one tile of ``--frame`` x ``--frame`` frame groups (``TOWER_TILE_PATCHES``
    patches, 16 groups at 448): what ``memory="auto"``'s ``vision_block_e`` /
    ``vision_block_i`` model. Runs on CPU (the saved tensors are the same set on GPU; the kernel's own are q, k, v,
    output and log-sum-exp on both)."""
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    spec = dict(QWEN2_5_VL_7B)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec).vision_config
    config.depth, config.fullatt_block_indexes, config._attn_implementation = 2, [1], "sdpa"
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=torch.bfloat16).train()
    from lightning_ulysses.models.multimodal import TOWER_TILE_PATCHES

    side = args.frame // config.patch_size
    tile = args.block_patches or TOWER_TILE_PATCHES
    groups = max(1, tile // (side * side))  # one tile of frame groups, as the tower encodes them
    grid = torch.tensor([[groups, side, side]])
    patches = groups * side * side
    pixels = torch.randn(patches, 3 * 2 * config.patch_size**2, dtype=torch.bfloat16)
    for index, kind in ((0, "windowed"), (1, "full attention")):
        seen: dict = {}
        handle = tower.blocks[index].register_forward_pre_hook(lambda m, a, kw: seen.update(a=a, kw=kw), with_kwargs=True)
        with torch.no_grad():
            tower(pixels, grid_thw=grid)
        handle.remove()
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = seen["a"][0].detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tower.blocks[index](x, *seen["a"][1:], **seen["kw"])
        per_patch = sum(storages.values()) / patches
        print(f"{kind} block, {patches:,} patches: {per_patch:,.0f} bytes saved per patch "
              f"= {(per_patch - 8 * config.intermediate_size) / config.hidden_size:.1f} x width + 8 x MLP width")


def tower_attention(args) -> None:
    """The Qwen2.5-VL-7B tower (32 blocks, random init, bf16) on one tile of ``TOWER_TILE_PATCHES`` patches: forward,
    and forward + backward, under transformers' sdpa (one kernel call per window / frame group) and under
    ``TOWER_ATTENTION`` (one call per window size, ``kernels/segments.py``), and the largest difference of their
    features. Needs only torch and transformers (no DeepSpeed, no Lightning)."""
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from lightning_ulysses.compat.transformers import register_varlen_attention
    from lightning_ulysses.kernels.segments import segment_attention
    from lightning_ulysses.models.multimodal import TOWER_ATTENTION, TOWER_TILE_PATCHES, _merged

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    spec = dict(TINY if args.tiny else QWEN2_5_VL_7B)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec).vision_config
    config._attn_implementation = "sdpa"
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=dtype).to(device).train()
    register_varlen_attention(TOWER_ATTENTION, segment_attention)
    side = args.frame // config.patch_size
    groups = max(1, (args.block_patches or TOWER_TILE_PATCHES) // (side * side))
    grid = torch.tensor([[groups, side, side]], device=device)
    pixels = torch.randn(groups * side * side, 3 * 2 * config.patch_size**2, dtype=dtype, device=device)

    def features() -> torch.Tensor:
        return _merged(tower(pixels, grid_thw=grid))

    def timed(fn, reps: int = 3) -> float:
        fn()  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    def train_step() -> None:
        tower.zero_grad(set_to_none=True)
        features().float().square().mean().backward()

    rows, outs = [], {}
    for impl in ("sdpa", TOWER_ATTENTION):
        config._attn_implementation = impl
        with torch.no_grad():
            outs[impl] = features().float()
            fwd = timed(features)
        rows.append((impl, fwd, timed(train_step)))
    diff = float((outs["sdpa"] - outs[TOWER_ATTENTION]).abs().max())
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{name}, Qwen2.5-VL-7B tower ({config.depth} blocks), one tile: {pixels.shape[0]:,} patches "
          f"({groups} groups of {args.frame}x{args.frame}); features max |diff| {diff:.3g}")
    print("| tower attention | forward s | forward + backward s |\n|---|---|---|")
    for impl, fwd, both in rows:
        print(f"| {impl} | {fwd:.3f} | {both:.3f} |")
    print(f"speed-up: forward {rows[0][1] / rows[1][1]:.2f}x, forward + backward {rows[0][2] / rows[1][2]:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4, help="language model layers (the tower stays whole)")
    p.add_argument("--seq-lens", type=int, nargs="*", default=[65536, 131072])
    p.add_argument("--modes", nargs="+", default=["trained", "frozen"], choices=["trained", "frozen"])
    p.add_argument("--frame", type=int, default=448, help="frame side in pixels (a multiple of 28)")
    p.add_argument("--plan", default="auto", help="auto, or a candidate of lightning_ulysses.memory.candidates")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="toy widths (CPU smoke run)")
    p.add_argument("--out", default="vlm_throughput.jsonl", help="one JSON line per run is appended")
    p.add_argument("--report", action="store_true", help="print the table of every run in --out and exit")
    p.add_argument("--predict-sp", type=int, nargs="+", help="print the tower's per-rank prediction at these sp "
                   "degrees (split vs replicated) and exit; no GPU needed")
    p.add_argument("--block-saved-bytes", action="store_true", help="print the bytes one tower block saves per patch "
                   "for backward (CPU is enough) and exit")
    p.add_argument("--block-patches", type=int, help="patches for --block-saved-bytes (default: one tile, 16,384)")
    p.add_argument("--memory-profile", action="store_true", help="record the allocator over the last step (GPU) and "
                   "print what is live at its peak, by allocation site (needs the repository root on PYTHONPATH)")
    p.add_argument("--tower-attention", action="store_true", help="time the tower alone on one tile under sdpa "
                   "(a kernel call per window) and under the segment attention (a call per window size), and exit")
    p.add_argument("--tower-tile", type=int, help="the most patches per tower call, trained or frozen (default: the "
                   "package's tower_tile_patches: 16,384 trained, 65,536 frozen)")
    p.add_argument("--no-tower-leaves", action="store_true", help="hook every sub-module of a frozen tower's blocks "
                   "under ZeRO-3 (default: each block is one leaf module, zero3_leaf_tower_blocks)")
    p.add_argument("--time-profile", action="store_true", help="torch.profiler over the last step: the operators "
                   "with the most device and host time, printed after the table")
    args = p.parse_args()
    if args.block_saved_bytes:
        block_saved_bytes(args)
        return
    if args.tower_attention:
        tower_attention(args)
        return
    if args.predict_sp:
        predict(args)
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if not args.report:
        from lightning_ulysses.memory.auto import NothingFits

        for seq in args.seq_lens:
            for mode in args.modes:
                try:
                    run = fit(mode, seq, args)
                except (torch.OutOfMemoryError, NothingFits) as e:
                    run = {"mode": mode, "seq": seq, "layers": args.layers, "plan": args.plan,
                           "error": "OOM" if isinstance(e, torch.OutOfMemoryError) else "nothing fits: " + str(e).splitlines()[0]}
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                run["device"] = device
                print(json.dumps(run), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(run) + "\n")
    with open(args.out) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    report(runs, runs[0]["device"] if runs else device, args)
    for r in runs:
        if r.get("profile"):
            from benchmarks.memory_peak import print_profile

            print_profile(f"{r['mode']} at {r['seq']:,} tokens", r["profile"])
        for side, table in (r.get("time_profile") or {}).items():
            print(f"\n{r['mode']} at {r['seq']:,} tokens, the last step by self {side} time:\n{table}")


if __name__ == "__main__":
    main()
