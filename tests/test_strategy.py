"""Registry names, Trainer wiring and argument validation of UlyssesDeepSpeedStrategy."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import StrategyRegistry

import lightning_ulysses  # noqa: F401
from lightning_ulysses import UlyssesDeepSpeedStrategy


@pytest.mark.parametrize(
    "name, stage, offload",
    [("ulysses", 3, False), ("ulysses_stage_1", 1, False), ("ulysses_stage_2", 2, False),
     ("ulysses_stage_3", 3, False), ("ulysses_stage_3_offload", 3, True)],
)
def test_registered_names_build_the_strategy(name, stage, offload) -> None:
    assert name in StrategyRegistry and StrategyRegistry[name]["description"]
    trainer = Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, UlyssesDeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in strategy.config["zero_optimization"]) == offload
    assert strategy.sequence_parallel_size == "auto"


def test_zero3_releases_gathered_parameters_unless_told_otherwise() -> None:
    released = {"stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0}
    zero = UlyssesDeepSpeedStrategy(stage=3).config["zero_optimization"]
    assert {k: zero[k] for k in released} == released
    assert not set(released) & set(UlyssesDeepSpeedStrategy(stage=2).config["zero_optimization"])
    assert not set(released) & set(UlyssesDeepSpeedStrategy(stage=3, zero3_prefetch=True).config["zero_optimization"])
    # a key the user's config names wins; the other is still chosen
    config = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 50_000_000}}
    zero = UlyssesDeepSpeedStrategy(config=config).config["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 50_000_000 and zero["stage3_max_reuse_distance"] == 0


def test_cpu_devices_get_an_index_per_local_rank() -> None:
    trainer = Trainer(strategy="ulysses", accelerator="cpu", devices=2, logger=False)
    assert trainer.strategy.parallel_devices == [torch.device("cpu", 0), torch.device("cpu", 1)]


def test_sampler_sees_the_dp_layout_only() -> None:
    from lightning.pytorch.plugins.environments import LightningEnvironment

    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=2)
    strategy.cluster_environment = LightningEnvironment()
    strategy.parallel_devices = [torch.device("cpu")] * 4
    strategy.set_world_ranks()
    assert strategy.world_size == 4
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        (dict(sequence_parallel_size=0), "positive int or 'auto'"),
        (dict(sequence_parallel_size="max"), "positive int or 'auto'"),
        (dict(pad_to_multiple_of=0), "pad_to_multiple_of must be a positive int"),
        (dict(seq_parallel_communication_data_type="int8"), "must be one of ['fp32', 'bf16', 'fp16']"),
        (dict(activation_checkpoint_cpu_offload=False, activation_checkpoint_cpu_offload_keep_layers=2),
         "tunes activation_checkpoint_cpu_offload, but activation_checkpoint_cpu_offload=False"),
        (dict(activation_checkpoint_cpu_offload=True, activation_checkpoint_cpu_offload_keep_layers=-1), "must be >= 0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, fix) -> None:
    with pytest.raises(ValueError) as err:
        UlyssesDeepSpeedStrategy(**kwargs)
    assert fix in str(err.value)


def test_sequence_parallel_without_a_transformers_model_names_the_fix() -> None:
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=2)
    strategy._lightning_module = LightningModule()
    with pytest.raises(ValueError, match="could not find a transformers PreTrainedModel"):
        strategy._resolve_layout()


def test_teardown_makes_no_host_copy_of_optimizer_state_or_module(monkeypatch) -> None:
    import lightning.pytorch.strategies.strategy as base
    import torch

    from lightning.pytorch import LightningModule

    from lightning_ulysses import UlyssesDeepSpeedStrategy

    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=1)
    Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False)
    module = LightningModule()
    module.layer = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    module.layer(torch.ones(1, 2)).sum().backward()
    opt.step()
    moved = []
    monkeypatch.setattr(base, "_optimizers_to_device", lambda opts, device: moved.extend(opts))
    monkeypatch.setattr(type(module), "cpu", lambda self: moved.append("module") or self)
    strategy._lightning_module = module
    strategy.optimizers = [opt]
    strategy.teardown()
    assert moved == []  # neither the optimizer state nor the module went through a host copy
    assert strategy.optimizers == [opt] and "cpu" not in module.__dict__  # state as before, shadow removed

