"""``lightning-ulysses`` / ``python -m lightning_ulysses``: LightningCLI over CausalLMModule, plus tools.

Subcommands: LightningCLI's ``fit``, ``validate``, ``test``, ``predict``; and the tools ``compare RUN_A RUN_B``
(:mod:`lightning_ulysses.tools.compare`), ``export CHECKPOINT OUT_DIR`` (:mod:`lightning_ulysses.tools.export`) and
``plan --config CONFIG`` (:mod:`lightning_ulysses.tools.plan`).

``trainer.devices: auto`` on a machine without a GPU starts :data:`CPU_AUTO_DEVICES` processes (Lightning's
own ``auto`` starts one): CPU runs exist to try sequence parallelism out, which needs at least two ranks.
On GPU machines ``auto`` is Lightning's (every visible GPU).
"""

from __future__ import annotations

import sys
from typing import NoReturn, Optional, Sequence

from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

import lightning_ulysses  # noqa: F401  (registers the "ulysses*" strategy names)
from lightning_ulysses.parallel.layout import exit_distributed, shutdown_distributed
from lightning_ulysses.lightning.module import CausalLMModule

CPU_AUTO_DEVICES = 2
TOOLS = {"compare": "lightning_ulysses.tools.compare", "export": "lightning_ulysses.tools.export",
         "plan": "lightning_ulysses.tools.plan"}


class UlyssesCLI(LightningCLI):
    """LightningCLI with the CPU meaning of ``devices: auto`` described in the module docstring."""

    @override
    def before_instantiate_classes(self) -> None:
        import torch

        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.get("trainer") if config is not None else None
        if trainer is None:
            return
        accelerator = str(trainer.get("accelerator", "auto"))
        if str(trainer.get("devices", "auto")) == "auto" and accelerator in ("auto", "cpu") and not torch.cuda.is_available():
            trainer["devices"] = CPU_AUTO_DEVICES
            trainer["accelerator"] = "cpu"


def main(args: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOLS:
        import importlib

        try:
            code = importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
        except (ImportError, ValueError, OSError) as exc:  # a bad input or a missing extra: one line, no traceback
            print(f"lightning-ulysses {argv[0]}: error: {exc}", file=sys.stderr)
            code = 1
        raise SystemExit(code)
    UlyssesCLI(
        CausalLMModule,
        subclass_mode_model=True,  # CausalLMModule unless the config names another (PreferenceModule, ...)
        datamodule_class=None,
        subclass_mode_data=True,
        args=None if args is None else argv,  # None: LightningCLI reads sys.argv itself (no duplicate-args warning)
        save_config_kwargs={"overwrite": True},
    )
    shutdown_distributed()


def entry_point() -> NoReturn:
    """``lightning-ulysses`` and ``python -m lightning_ulysses``: :func:`main`, then the process ends through
    :func:`~lightning_ulysses.parallel.layout.exit_distributed`, so a finished run exits 0 instead of racing the
    process groups' threads during interpreter shutdown. An error propagates as usual (non-zero exit)."""
    main()
    exit_distributed(0)


if __name__ == "__main__":
    entry_point()
