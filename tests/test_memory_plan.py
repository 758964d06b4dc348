"""The memory-trick abstraction: one object per trick, one ordered plan, the flat flags as an alias."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_ulysses import UlyssesDeepSpeedStrategy
from lightning_ulysses.memory import (
    TRICKS,
    ActivationOffload,
    GradientCheckpointing,
    MemoryEfficientSwiGLU,
    MemoryTrick,
    TiledLoss,
    TiledMLP,
    apply_tricks,
    trainer_tricks,
    tricks_from_flags,
)
from lightning_ulysses.memory.activation_checkpoint import checkpoint_policy_of

README = Path(__file__).resolve().parents[1] / "README.md"


def _tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def test_every_registered_trick_has_a_readme_row_naming_its_flag_and_class() -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `")]
    for kind in TRICKS:
        assert any(f"`{kind.flag}`" in r and f"`{kind.__name__}(" in r for r in rows), kind.__name__
    assert [k.order for k in TRICKS] == sorted({k.order for k in TRICKS}), "one place per trick in the order"


def test_flags_build_the_tricks_with_sp_defaults() -> None:
    plan = tricks_from_flags(tiled_mlp=True, tiled_mlp_tile_tokens=8, activation_checkpoint_cpu_offload=True,
                             activation_checkpoint_cpu_offload_keep_layers=1)
    assert plan.resolve(False) == [TiledMLP(8), ActivationOffload(keep_layers=1)]
    assert plan.resolve(True) == [GradientCheckpointing(), TiledLoss(), TiledMLP(8), ActivationOffload(keep_layers=1)]
    assert tricks_from_flags(gradient_checkpointing=False, tiled_loss=False).resolve(True) == []
    assert tricks_from_flags(checkpoint_policy="save_attention").resolve(False) == [GradientCheckpointing("save_attention")]


def test_one_rule_for_a_tuning_option_given_without_its_switch() -> None:
    """Given (not at its default) while the switch is unset, a tuning option turns its trick on; with the switch False
    it is an error naming both. The same for every trick of the registry."""
    from lightning_ulysses.memory.plan import flat_options

    values = {"checkpoint_policy": "save_attention", "save_attention_layers": 1, "tiled_loss_tile_tokens": 64,
              "tiled_loss_impl": "torch", "tiled_mlp_tile_tokens": 64, "memory_efficient_impl": "torch",
              "tiled_attention_tile_tokens": 64, "activation_checkpoint_cpu_offload_keep_layers": 1}
    for kind in TRICKS:
        for option in kind.flag_options:
            extra = {"checkpoint_policy": "save_attention"} if option == "save_attention_layers" else {}
            plan = tricks_from_flags(**{option: values[option]}, **extra).resolve(False)
            assert any(type(t) is kind for t in plan), (kind.__name__, option)
            with pytest.raises(ValueError, match=f"tunes .*{kind.flag}.*, but .*{kind.flag}=False"):
                switches_off = {k.flag: False for k in TRICKS if option in k.flag_options}
                tricks_from_flags(**{option: values[option]}, **extra, **switches_off)
    # an option that tunes two tricks applies to the one switched on, and turns both on only when none is
    assert tricks_from_flags(memory_efficient_rmsnorm=True, memory_efficient_impl="torch").resolve(False) == [
        TRICKS[[k.__name__ for k in TRICKS].index("MemoryEfficientRMSNorm")]("torch")]
    assert len(tricks_from_flags(memory_efficient_impl="torch").resolve(False)) == 2
    assert tricks_from_flags(tiled_mlp_tile_tokens=None).resolve(False) == []  # the default is not "given"
    with pytest.raises(ValueError, match=r"tiled_mlp \(tiled_mlp_tile_tokens=0\): tiled MLP tile_tokens"):
        tricks_from_flags(tiled_mlp_tile_tokens=0)
    with pytest.raises(TypeError, match="unknown memory option"):
        tricks_from_flags(tiled_mpl=True)
    with pytest.raises(ValueError, match="builds on gradient_checkpointing"):
        tricks_from_flags([ActivationOffload()], gradient_checkpointing=False)
    assert set(flat_options()) == {o for k in TRICKS for o in (k.flag, *k.flag_options)}


def test_strategy_signature_spells_every_flat_option_with_its_default() -> None:
    import inspect

    from lightning_ulysses.memory.plan import flat_options

    params = inspect.signature(UlyssesDeepSpeedStrategy.__init__).parameters
    for name, default in flat_options().items():
        assert name in params and params[name].default == default, name
        assert f"{name}:" in UlyssesDeepSpeedStrategy.__doc__, f"{name} is not documented in the strategy's docstring"


def test_explicit_tricks_replace_defaults_and_conflicts_are_refused() -> None:
    plan = tricks_from_flags([ActivationOffload(min_bytes=4), TiledLoss(tile_tokens=16)])
    assert plan.resolve(True) == [GradientCheckpointing(), TiledLoss(16), ActivationOffload(min_bytes=4)]
    with pytest.raises(ValueError, match="use one of the two"):
        tricks_from_flags([TiledMLP(4)], tiled_mlp=True)
    with pytest.raises(ValueError, match="Two TiledMLP tricks with different settings"):
        tricks_from_flags([TiledMLP(4), TiledMLP(8)])
    with pytest.raises(TypeError, match="MemoryTrick objects"):
        tricks_from_flags(["tiled_mlp"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="tiled MLP tile_tokens must be a positive int"):
        TiledMLP(0)


def test_strategy_takes_the_list_and_reads_the_plan_back_through_its_flags() -> None:
    s = UlyssesDeepSpeedStrategy(sequence_parallel_size=1, memory=[TiledMLP(tile_tokens=8)], memory_efficient_swiglu=True)
    assert s.tiled_mlp == TiledMLP(8) and s.memory_efficient_swiglu == MemoryEfficientSwiGLU()
    assert s.activation_checkpoint_cpu_offload is None
    assert UlyssesDeepSpeedStrategy(tiled_mlp=True).tiled_mlp == TiledMLP()


def test_the_plan_order_does_not_depend_on_the_list_order() -> None:
    a, b = _tiny_llama(), _tiny_llama()
    apply_tricks(a, [ActivationOffload(), MemoryEfficientSwiGLU("torch"), TiledMLP(3), GradientCheckpointing("save_attention")])
    apply_tricks(b, [GradientCheckpointing("save_attention"), TiledMLP(3), MemoryEfficientSwiGLU("torch"), ActivationOffload()])
    for m in (a, b):  # offload kept the chosen policy; the tiled MLP runs the fused SwiGLU in its tiles
        assert checkpoint_policy_of(m) == "save_attention"
        assert type(m.model.layers[0].mlp).__name__ == "TiledLlamaMLP"


def test_callbacks_replace_the_strategys_trick_of_their_kind() -> None:
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=1, tiled_mlp=True, activation_checkpoint_cpu_offload=True)
    strategy.memory_tricks = strategy.memory_plan.resolve(False)
    trainer = type("T", (), {"callbacks": [TiledMLP(tile_tokens=2)], "strategy": strategy})()
    assert trainer_tricks(trainer) == [TiledMLP(2), ActivationOffload()]
    assert all(isinstance(t, MemoryTrick) for t in trainer_tricks(trainer))


def test_yaml_memory_list_through_the_cli(tmp_path) -> None:
    from lightning_ulysses.lightning.cli import UlyssesCLI
    from lightning_ulysses.lightning.module import CausalLMModule

    config = tmp_path / "memory.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 1\n  strategy:\n    class_path: lightning_ulysses.UlyssesDeepSpeedStrategy\n"
        "    init_args:\n      sequence_parallel_size: 1\n      memory:\n"
        "        - class_path: lightning_ulysses.TiledMLP\n          init_args: {tile_tokens: 8192}\n"
        "        - class_path: lightning_ulysses.ActivationOffload\n          init_args: {keep_layers: 4}\n"
        "model:\n  model: {model_type: llama, vocab_size: 64, hidden_size: 32, intermediate_size: 64,"
        " num_hidden_layers: 2, num_attention_heads: 4}\n"
    )
    cli = UlyssesCLI(CausalLMModule, run=False, save_config_callback=None,
                     args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.strategy.memory_plan.resolve(False) == [TiledMLP(8192), ActivationOffload(keep_layers=4)]


def test_recomputed_flops_follow_the_model_state() -> None:
    from lightning_ulysses.models.flops import ModelDims, recompute_flops

    model = _tiny_llama()
    dims = ModelDims.of(model)
    assert sum(k.recomputed_flops(model, dims, 10.0, 100.0) for k in TRICKS) == 0.0
    GradientCheckpointing().apply(model)
    assert sum(k.recomputed_flops(model, dims, 10.0, 100.0) for k in TRICKS) == recompute_flops(dims, 10.0, 100.0)
    assert re.match(r"GradientCheckpointing\(policy='full'", repr(GradientCheckpointing()))
