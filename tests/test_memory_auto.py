"""``memory="auto"`` and ``lightning-ulysses plan`` (:mod:`lightning_ulysses.memory.auto`, :mod:`lightning_ulysses.tools.plan`):
the plan chosen for fixed inputs, the user's flags kept, the early error with its ways out, the command's output and
exit codes. The parity of ``memory="auto"`` with the plan it chose set by hand runs in ``tests/test_edges.py``'s job."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lightning_ulysses.memory.auto import (
    COEFFICIENTS, Hardware, NothingFits, Workload, candidates, choose, estimate, longest_sequence, merge_user_flags,
)
from lightning_ulysses.memory.candidates import CANDIDATES

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B_4L = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def _workload(seq_len: int, layers: int = 4, **layout) -> Workload:
    from transformers import AutoConfig

    spec = dict(LLAMA_8B_4L, num_hidden_layers=layers)
    return Workload.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec), seq_len, **layout)


@pytest.mark.parametrize(
    "seq_len, gpu, host, chosen",
    [
        (65536, 141.0, 1000.0, "no_checkpointing"),  # a big GPU and short sequences: nothing recomputed
        (131072, 80.0, 1000.0, "save_attention"),  # an 80 GiB GPU: attention kept, the rest recomputed
        (262144, 80.0, 1000.0, "save_attention+offload+tiled_mlp"),  # inputs leave the GPU, the MLP runs in tiles
        (524288, 80.0, 1000.0, "full+offload+tiled"),  # only the leanest stack fits
        (524288, 96.0, 20.0, "full+offload+tiled, keep 1"),  # little host RAM: one layer input stays on the GPU
        (524288, 48.0, 20.0, None),  # neither fits: nothing does
    ],
)
def test_the_fastest_plan_that_fits_is_chosen(seq_len, gpu, host, chosen) -> None:
    w = _workload(seq_len)
    if chosen is None:
        with pytest.raises(NothingFits):
            choose(w, Hardware(gpu, host))
        return
    best, estimates = choose(w, Hardware(gpu, host))
    assert best.name == chosen and best.fits
    faster = [e for e in estimates if e.step_time < best.step_time]
    assert all(not e.fits for e in faster), [e.name for e in faster if e.fits]
    assert best.gpu_peak_gib <= 0.9 * gpu and best.host_peak_gib <= 0.9 * host


def test_host_memory_caps_the_offload() -> None:
    """Offloaded layer inputs live in host RAM shared by a node's ranks: when the plan chosen with plenty of it does
    not fit the host, another plan is chosen that does (inputs kept on the GPU, some layers kept, or less saved)."""
    w = _workload(262144, layers=8, ranks_per_node=8)
    plenty, _ = choose(w, Hardware(80.0, 2000.0))
    assert "offload" in plenty.name
    host = plenty.host_peak_gib / 0.9 - 1.0
    tight, _ = choose(w, Hardware(80.0, host))
    assert tight.name != plenty.name and tight.host_peak_gib <= 0.9 * host


def test_predictions_match_the_measured_cli_runs() -> None:
    """The coefficients reproduce the one-GPU runs (8B width, ZeRO-3, AdamW; docs/benchmarks.md, 2026-12-01 and
    2026-12-05, H100 and H200): within 10%, and never below a measurement by more than 5% (inside the 10% margin)."""
    measured = [(4, 131072, "full+offload+tiled", 39.84), (4, 262144, "full+offload+tiled", 48.25),
                (4, 131072, "save_attention+offload", 53.83), (4, 131072, "save_attention", 56.83),
                (8, 131072, "full+offload+tiled", 57.72), (4, 65536, "no_checkpointing", 66.13),
                (4, 262144, "full+offload", 72.37), (8, 131072, "save_attention[3]+offload", 66.83),
                (4, 262144, "save_attention+offload", 78.46), (8, 65536, "no_checkpointing", 113.16),
                (8, 262144, "save_attention", 113.58), (4, 262144, "save_attention", 84.46),
                (4, 262144, "save_attention+offload+tiled_mlp", 59.38), (8, 262144, "full+offload+tiled", 61.26),
                (4, 524288, "full+offload+tiled", 72.99)]
    for layers, seq, plan, gib in measured:
        w = _workload(seq, layers=layers)
        e = estimate(plan, candidates(w)[plan], w)
        assert -0.05 < e.gpu_peak_gib / gib - 1 < 0.10, (layers, seq, plan, e.gpu_peak_gib, gib)
    # 8B width with LoRA r=16 on all linear layers, bf16 adapters, full+offload+tiled, no validation (one H100,
    # 2026-12-06): a LoRA model's backward working set is a fully trained model's. GPU and host (the process's peak
    # resident memory) peaks; the 32-layer step is at 95% of the longest length `plan` gives for that H100
    from lightning_ulysses.memory.auto import lora_params

    for layers, seq, gib, host in ((16, 131072, 19.27, 19.3), (16, 262144, 28.11, 36.2), (32, 408576, 44.87, 105.2)):
        w = _workload(seq, layers=layers)
        w = replace(w, trainable_params=lora_params(w, {"r": 16, "target_modules": "all-linear"}))
        e = estimate("full+offload+tiled", candidates(w)["full+offload+tiled"], w)
        assert -0.05 < e.gpu_peak_gib / gib - 1 < 0.10, (layers, seq, e.gpu_peak_gib, gib)
        assert -0.05 < e.host_peak_gib / host - 1 < 0.15, (layers, seq, e.host_peak_gib, host)
    # without checkpointing, one DPO-style pair per row (packed) vs the same tokens as one document, each fit in a
    # fresh process (one H100, 2026-12-06)
    for seq, packed, gib in [(32768, True, 49.32), (32768, False, 48.32), (65536, True, 68.60)]:
        w = replace(_workload(seq), packed=packed)
        e = estimate("no_checkpointing", CANDIDATES["no_checkpointing"], w)
        assert -0.05 < e.gpu_peak_gib / gib - 1 < 0.10, (seq, packed, e.gpu_peak_gib, gib)
    assert set(COEFFICIENTS) >= {"working_set_h", "untiled_attention_h", "untiled_mlp_i", "zero3_layer_param_bytes",
                                 "packed_attention_h"}


def test_packed_rows_leave_no_checkpointing_where_it_no_longer_fits() -> None:
    """At 131,072 tokens on a 117 GiB GPU one document per row trains without checkpointing; rows of packed samples
    (their per-sample attention keeps 2 H bytes per token and layer more) get save_attention. The data modules say
    whether they pack."""
    from lightning_ulysses.data import PreferenceDataModule, SFTDataModule
    from lightning_ulysses.lightning.auto_plan import packs_rows

    one, _ = choose(_workload(131072), Hardware(117.0, 1000.0))
    packed, _ = choose(replace(_workload(131072), packed=True), Hardware(117.0, 1000.0))
    assert (one.name, packed.name) == ("no_checkpointing", "save_attention")
    tok = str(ROOT / "data" / "tokenizer")
    assert packs_rows(PreferenceDataModule("x.jsonl", tok, packing="none"))  # chosen + rejected in one row
    assert packs_rows(SFTDataModule("x.jsonl", tok)) and not packs_rows(SFTDataModule("x.jsonl", tok, packing="none"))
    assert not packs_rows(None)
    from lightning_ulysses import CausalLMModule, PreferenceModule

    tiny = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2}
    assert packs_rows(None, PreferenceModule(tiny)) and not packs_rows(None, CausalLMModule(tiny))  # a plain loader
    # a plain DataLoader of packed rows under a plan chosen for one document: the strategy warns at the first packed
    # batch, naming the predicted peak, when the plan would not fit them (it still fits one document)
    from lightning_ulysses.lightning.auto_plan import packed_rows_warning

    hw = Hardware(117.0, 1000.0)
    message = packed_rows_warning(one, _workload(131072), hw)
    assert "no_checkpointing" in message and "SFTDataModule" in message and "gradient_checkpointing=True" in message
    assert packed_rows_warning(packed, replace(_workload(131072), packed=True), hw) is None  # planned as packed
    assert packed_rows_warning(*choose(_workload(65536), hw)[:1], _workload(65536), hw) is None  # fits packed too


def test_the_users_flags_stay_in_every_plan() -> None:
    user = {"tiled_mlp": True, "tiled_mlp_tile_tokens": 2048, "gradient_checkpointing": True}
    merged = merge_user_flags(CANDIDATES["no_checkpointing"], user)
    assert merged["tiled_mlp"] is True and merged["tiled_mlp_tile_tokens"] == 2048
    assert merged["gradient_checkpointing"] is True  # the user's switch, not the plan's False
    best, estimates = choose(_workload(65536), Hardware(141.0, 1000.0), user)
    assert all(e.flags["tiled_mlp"] is True for e in estimates) and best.flags["gradient_checkpointing"] is True
    # plans the user's options make identical are one, under the name of the plan they became
    names = list(candidates(_workload(65536), {"gradient_checkpointing": True}))
    assert "no_checkpointing" not in names and "full" in names
    every = dict(CANDIDATES["full+offload+tiled"])  # a config that sets every trick itself (the shipped one)
    assert list(candidates(_workload(65536), every)) == ["full+offload+tiled"]


def test_nothing_fits_names_the_shortfall_and_the_ways_out() -> None:
    with pytest.raises(NothingFits) as err:
        choose(_workload(4_000_000), Hardware(80.0, 500.0))
    text = str(err.value)
    assert "No memory plan fits 4,000,000 tokens" in text and "the leanest" in text
    assert "sequence_parallel_size=" in text and "GPU" in text
    assert "sequences of at most" in text
    assert err.value.estimates


def test_longest_sequence_is_monotone_in_memory() -> None:
    w = _workload(131072)
    flags = CANDIDATES["full+offload+tiled"]
    small, big = longest_sequence(flags, w, Hardware(80.0, 1000.0)), longest_sequence(flags, w, Hardware(141.0, 1000.0))
    assert 0 < small < big
    assert estimate("", flags, _workload(small), Hardware(80.0, 1000.0)).fits
    assert not estimate("", flags, _workload(small + 4096), Hardware(80.0, 1000.0)).fits


def test_strategy_memory_option_is_checked() -> None:
    from lightning_ulysses import UlyssesDeepSpeedStrategy

    assert UlyssesDeepSpeedStrategy(memory="auto", max_seq_len=4096).memory_auto
    with pytest.raises(ValueError, match="list of MemoryTrick objects or 'auto'"):
        UlyssesDeepSpeedStrategy(memory="fast")
    with pytest.raises(ValueError, match="max_seq_len must be an int >= 2"):
        UlyssesDeepSpeedStrategy(memory="auto", max_seq_len=0)


def test_nothing_fits_fails_before_the_model_is_built(monkeypatch) -> None:
    """The plan is chosen in setup_environment, before configure_model builds (or loads) the model."""
    import lightning as L

    import lightning_ulysses.lightning.auto_plan as auto_plan
    from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy
    from lightning_ulysses.data import SyntheticLMDataModule

    monkeypatch.setattr(auto_plan, "host_available_gib", lambda: 1e-4)  # on CPU the device memory is host memory
    module = CausalLMModule(dict(LLAMA_8B_4L, num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    trainer = L.Trainer(strategy=UlyssesDeepSpeedStrategy(sequence_parallel_size=1, memory="auto"), accelerator="cpu",
                        devices=1, max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(NothingFits, match="No memory plan fits 128 tokens"):
        trainer.fit(module, SyntheticLMDataModule(vocab_size=256, seq_len=128))
    assert module.model is None  # never built


def _override(tmp_path: Path) -> Path:
    """The shipped config with a model given as a config dict (no hub download)."""
    p = tmp_path / "model.yaml"
    p.write_text("model:\n  model: {model_type: llama, hidden_size: 4096, intermediate_size: 14336, num_hidden_layers: 4, "
                 "num_attention_heads: 32, num_key_value_heads: 8, vocab_size: 128256}\n")
    return p


def test_plan_command_marks_the_choice_and_exits_0_when_something_fits(tmp_path, capsys) -> None:
    from lightning_ulysses.lightning.cli import main

    config = str(ROOT / "configs" / "llama3_8b_long_context.yaml")
    with pytest.raises(SystemExit) as code:
        main(["plan", "--config", config, "--config", str(_override(tmp_path)), "--devices", "1",
              "--gpu-memory-gib", "80", "--host-memory-gib", "120"])
    out = capsys.readouterr().out
    assert code.value.code == 0
    assert "<- auto" in out and "memory: auto chooses save_attention" in out
    assert "(this config's own options)" in out  # the shipped config sets its tricks by hand: shown as a row
    for name in CANDIDATES:
        assert name in out
    assert "longest seq" in out


def test_plan_command_exits_1_with_the_ways_out_when_nothing_fits(tmp_path, capsys) -> None:
    from lightning_ulysses.lightning.cli import main

    config = str(ROOT / "configs" / "llama3_8b_long_context.yaml")
    with pytest.raises(SystemExit) as code:
        main(["plan", "--config", config, "--config", str(_override(tmp_path)), "--devices", "1",
              "--seq-len", "4000000", "--gpu-memory-gib", "80", "--host-memory-gib", "500"])
    out = capsys.readouterr().out
    assert code.value.code == 1
    assert "No memory plan fits 4,000,000 tokens" in out and "Ways out that would fit" in out


def test_plan_command_without_a_gpu_asks_for_its_memory(tmp_path, capsys) -> None:
    import torch

    from lightning_ulysses.lightning.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as code:
        main(["plan", "--config", str(ROOT / "configs" / "llama3_8b_long_context.yaml"), "--config",
              str(_override(tmp_path))])
    assert code.value.code == 1 and "--gpu-memory-gib" in capsys.readouterr().err


def test_frozen_companions_count_as_weights() -> None:
    """A DPO reference or a distillation teacher adds its bf16 weights (partitioned under ZeRO-3), nothing else; the
    modules say which companions they build, from the same arguments YAML gives them."""
    from transformers import AutoConfig

    from lightning_ulysses import CausalLMModule, DistillationModule, PreferenceModule
    from lightning_ulysses.memory.auto import static_bytes, workload_for_run

    spec = dict(LLAMA_8B_4L)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    alone = workload_for_run(config, 131072, world_size=2, sequence_parallel_size=2)
    paired = workload_for_run(config, 131072, world_size=2, sequence_parallel_size=2, frozen=[config])
    assert paired.frozen_params == alone.params
    assert static_bytes(paired)["gpu_frozen_weights"] == 2.0 * alone.params / 2  # bf16, ZeRO-3 over 2 ranks
    plan = "save_attention"
    grown = estimate(plan, CANDIDATES[plan], paired).gpu_peak_gib - estimate(plan, CANDIDATES[plan], alone).gpu_peak_gib
    assert abs(grown - alone.params / 2**30) < 1e-6
    zero2 = workload_for_run(config, 131072, world_size=2, zero_stage=2, frozen=[config])
    assert static_bytes(zero2)["gpu_frozen_weights"] == 2.0 * alone.params  # whole on every rank

    policy, ref = dict(LLAMA_8B_4L), dict(LLAMA_8B_4L, num_hidden_layers=2)
    assert PreferenceModule.frozen_model_specs({"model": policy}) == [policy]  # the policy's copy
    assert PreferenceModule.frozen_model_specs({"model": policy, "ref_model": ref}) == [ref]
    assert PreferenceModule.frozen_model_specs({"model": policy, "loss_type": "simpo"}) == []
    assert PreferenceModule.frozen_model_specs({"model": policy, "peft": {"peft_type": "LORA"}}) == []  # adapters off
    assert DistillationModule.frozen_model_specs({"student": policy, "teacher": ref}) == [ref]
    assert CausalLMModule.frozen_model_specs({"model": policy}) == []
    assert PreferenceModule(policy, ref_model=ref).frozen_specs == [ref]
    assert DistillationModule(policy, ref).frozen_specs == [ref]
    assert CausalLMModule(policy).frozen_specs == []


def test_plan_command_counts_the_reference_of_a_preference_config(capsys) -> None:
    from lightning_ulysses.lightning.cli import main

    for name, frozen in (("dpo_long", True), ("distill_long", True), ("sft_chat", False)):
        with pytest.raises(SystemExit) as code:
            main(["plan", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--devices", "2",
                  "--gpu-memory-gib", "80", "--host-memory-gib", "100"])
        out = capsys.readouterr().out
        assert code.value.code == 0
        assert ("frozen companions" in out) == frozen, (name, out)


def test_plan_command_knows_which_configs_pack_rows() -> None:
    from lightning_ulysses.tools.plan import load_yaml, run_facts

    packs = {name: run_facts(load_yaml([str(ROOT / "configs" / f"{name}.yaml")]), 2, None)["packed"]
             for name in ("dpo_long", "sft_chat", "sft_vlm", "llama3_8b_long_context", "distill_long")}
    assert packs == {"dpo_long": True, "sft_chat": True, "sft_vlm": True, "llama3_8b_long_context": False,
                     "distill_long": True}


def test_a_vision_language_models_tower_is_planned_as_weights_gradients_and_optimizer_state() -> None:
    import sys

    from transformers import AutoConfig

    from lightning_ulysses.memory.auto import static_bytes, vision_tower_params, workload_for_run

    sys.path.insert(0, str(ROOT / "tests" / "workers"))
    from multimodal import QWEN2_VL

    spec = dict(QWEN2_VL)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    from tests.test_multimodal import _model

    tower = sum(p.numel() for n, p in _model().named_parameters() if ".visual." in n)
    assert vision_tower_params(config) == tower > 0
    w = workload_for_run(config, 1024, world_size=1, sequence_parallel_size=1, zero_stage=2)
    text = replace(w, vision=None)
    grown = {k: static_bytes(w)[k] - static_bytes(text)[k] for k in ("gpu_weights", "gpu_gradients", "gpu_optimizer")}
    assert grown == {"gpu_weights": 2.0 * tower, "gpu_gradients": 2.0 * tower, "gpu_optimizer": 12.0 * tower}

    # activations: the batch's pixels and features always; a trained tower's block inputs under checkpointing (all of
    # its blocks' activations without); each SP rank encodes half the patches at sp=2; a frozen tower keeps none
    from lightning_ulysses.memory.auto import vision_bytes

    long = replace(workload_for_run(config, 4096, zero_stage=3), sp=1)
    v = long.vision
    assert (v.layers, v.hidden, v.patches_per_token, v.patch_bytes) == (1, 16, 4, 4 * 3 * 2 * 2 * 2)
    # the projector (Qwen-VL's merger: 8 bytes per patch and unit of the tower's width) is never checkpointed
    projector = max(8.0 * 4 * v.hidden, 2.0 * 4 * v.hidden + 4.0 * long.hidden) * 4096
    pixels_and_features = 4096 * 4 * v.patch_bytes + 4.0 * long.hidden * 4096 + projector
    kept, work = vision_bytes(long, checkpointing=True)
    assert kept == pixels_and_features + 2.0 * v.hidden * 4096 * 4 * v.layers and work > 0
    assert vision_bytes(long, checkpointing=False)[0] == pixels_and_features + work * v.layers
    assert vision_bytes(replace(long, sp=2), checkpointing=True)[0] < kept  # the units are split over the ranks
    # a frozen encoder: its forward keeps nothing; the projector still trains (freeze_projector freezes it too)
    frozen = workload_for_run(config, 4096, freeze_vision_tower=True)
    assert vision_bytes(frozen, checkpointing=True)[0] == pixels_and_features
    both = workload_for_run(config, 4096, freeze_vision_tower=True, freeze_projector=True)
    assert vision_bytes(both, checkpointing=True)[0] == 4096 * 4 * v.patch_bytes + 2.0 * long.hidden * 4096
    opt = {k: static_bytes(x)["gpu_optimizer"] for k, x in (("long", long), ("frozen", frozen), ("both", both))}
    assert opt["long"] - opt["frozen"] == 12.0 * (v.n_params - v.projector_params)  # the encoder's state goes
    assert opt["frozen"] - opt["both"] == 12.0 * v.projector_params > 0  # then the projector's
    few = replace(long, vision_tokens=256)  # rows known to hold at most 256 vision tokens
    assert vision_bytes(few, checkpointing=True)[0] < kept
    e = estimate("full", CANDIDATES["full"], long)
    assert e.gpu_parts["vision"] * 2**30 == kept


def test_the_projector_coefficient_is_what_autograd_saves_in_qwen_vls_merger() -> None:
    """``vision_projector_e``: the bytes a trained Qwen2.5-VL merger saves for backward per language-model token,
    counted with autograd's saved-tensor hooks at the 7B tower's width (bf16; the merger's weights excluded)."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    from lightning_ulysses.memory.auto import COEFFICIENTS

    width, merge = 1280, 2
    merger = Qwen2_5_VLPatchMerger(dim=3584, context_dim=width, spatial_merge_size=merge).to(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in merger.parameters()}
    tokens = 64
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        merger(torch.randn(tokens * merge**2, width, dtype=torch.bfloat16))  # a frozen encoder's output
    assert sum(saved.values()) / tokens == COEFFICIENTS["vision_projector_e"] * merge**2 * width


def test_plan_command_reads_freeze_vision_tower(tmp_path, capsys) -> None:
    from lightning_ulysses.tools.plan import main as plan_main

    frozen = tmp_path / "frozen.yaml"
    frozen.write_text("model:\n  freeze_vision_tower: true\n")

    def predicted(*extra: str) -> float:
        code = plan_main(["--config", str(ROOT / "configs" / "sft_vlm.yaml"), *extra, "--seq-len", "4194304",
                          "--gpu-memory-gib", "1000", "--host-memory-gib", "1000", "--devices", "2"])
        out = capsys.readouterr().out
        assert code == 0, out
        return float(next(line for line in out.splitlines() if line.startswith("full ")).split()[1])

    assert predicted("--config", str(frozen)) < predicted()


def test_vision_flops_count_a_frozen_encoder_once_and_its_trained_projector_three_times() -> None:
    """``SequenceThroughput``'s tower FLOPs (``VisionDims.of`` a built model): ``freeze_vision_tower`` leaves the
    projector training, so the encoder runs forward only and the projector forward + backward, on merged tokens."""
    from lightning_ulysses.models.flops import VisionDims, vision_flops
    from lightning_ulysses.models.multimodal import freeze_vision
    from tests.test_multimodal import _model

    model = _model()
    trained = VisionDims.of(model)
    freeze_vision(model, tower=True, projector=False)
    frozen = VisionDims.of(model)
    assert (trained.trains, trained.projector_trains, frozen.trains, frozen.projector_trains) == (True, True, False, True)
    assert trained.projector_params == sum(p.numel() for p in model.model.visual.merger.parameters()) > 0
    patches, ppt = 64.0, trained.patches_per_token
    encoder = 2.0 * (trained.n_params - trained.projector_params) * patches
    projector = 2.0 * trained.projector_params * patches / ppt
    assert vision_flops(frozen, patches, 0.0) == encoder + 3 * projector
    assert vision_flops(trained, patches, 0.0) == 3 * encoder + 3 * projector
