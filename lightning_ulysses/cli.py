"""``lightning-ulysses`` / ``python -m lightning_ulysses``: LightningCLI over CausalLMModule."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import lightning_ulysses  # noqa: F401  (registers the "ulysses*" strategy names)
from lightning_ulysses.layout import shutdown_distributed
from lightning_ulysses.module import CausalLMModule


def main(args=None) -> None:
    LightningCLI(
        CausalLMModule,
        datamodule_class=None,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
    shutdown_distributed()


if __name__ == "__main__":
    main()
