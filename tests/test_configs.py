"""Every YAML in configs/ parses and instantiates through LightningCLI (on CPU, nothing is trained)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy
from tests.harness import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_instantiates(path: Path, tmp_path) -> None:
    cli = LightningCLI(
        CausalLMModule,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=["--config", str(path), "--trainer.accelerator=cpu", "--trainer.devices=1",
              f"--trainer.default_root_dir={tmp_path}"],
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, UlyssesDeepSpeedStrategy)
    if path.stem == "llama3_8b_long_context":
        assert strategy.tiled_mlp and strategy.activation_checkpoint_cpu_offload and strategy.tiled_loss
        assert strategy.memory_efficient_rmsnorm
        assert strategy.pad_to_multiple_of == 1024
