"""Fit, save mid-epoch with ModelCheckpoint, resume: several runs in one launched job.

``resume.py CASES_JSON OUT_DIR``: CASES_JSON maps a name to a run ``{stage, sp, batch_size, steps, save_every,
resume_from, ring_size, accumulate, dropout, optimizer, strategy (more strategy options), expect_error}``; runs go in order in the same processes (a resume case names an
earlier case's checkpoint, possibly written by another job at another world size). Rank 0 writes
``OUT_DIR/<name>.json``: the loss of every optimizer step (``{global_step: loss}``), the checkpoints written and the
final weights (gathered, ``<name>.pt``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy  # noqa: E402
from lightning_ulysses.data import SyntheticLMDataModule  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402

CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
}


class StepLosses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.samples: dict[int, list[int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # after the optimizer step of this batch, when it stepped
        self.samples.setdefault(step, []).append(int(batch["input_ids"][0, 0]))
        if "train_loss" in trainer.callback_metrics and step > 0:  # logged when the step completes
            self.losses[step] = float(trainer.callback_metrics["train_loss"])  # the step's loss over all ranks


def _weights(module: CausalLMModule) -> dict[str, torch.Tensor]:
    params = list(module.model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def run(name: str, case: dict, out: Path) -> None:
    torch.manual_seed(0)
    module = CausalLMModule(model=dict(CONFIG, attention_dropout=case.get("dropout", 0.0)),
                            optimizer=OPTIMIZERS[case.get("optimizer", "adamw")],
                            # halves the learning rate every 2 steps: a resume must restore the scheduler too
                            lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5))
    data = SyntheticLMDataModule(vocab_size=64, seq_len=16, num_train_samples=8, batch_size=case["batch_size"])
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=case["sp"], stage=case["stage"],
                                        ring_size=case.get("ring_size"), **case.get("strategy", {}))
    losses = StepLosses()
    callbacks = [losses]
    if case.get("save_every"):
        callbacks.append(ModelCheckpoint(dirpath=out / f"{name}_ckpts", filename="{step}", save_top_k=-1,
                                         every_n_train_steps=case["save_every"]))
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]),
                      max_steps=case["steps"], logger=False, enable_checkpointing=bool(case.get("save_every")),
                      callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, accumulate_grad_batches=case.get("accumulate", 1),
                      precision=case.get("precision", "32-true"))
    trainer.fit(module, data, ckpt_path=case.get("resume_from"))
    weights = _weights(module)
    if trainer.global_rank == 0:
        torch.save(weights, out / f"{name}.pt")
        ckpts = sorted(p.name for p in (out / f"{name}_ckpts").iterdir()) if case.get("save_every") else []
        (out / f"{name}.json").write_text(json.dumps(
            {"losses": losses.losses, "samples": losses.samples, "checkpoints": ckpts, "epoch": trainer.current_epoch}))


def main() -> None:
    cases, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    for name, case in cases.items():
        if case.get("expect_error"):
            try:
                run(name, case, out)
            except (RuntimeError, ValueError, SystemExit) as exc:  # rank 0 raises, the others stop quietly
                if int(os.environ["RANK"]) == 0:
                    (out / f"{name}.json").write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
            continue
        run(name, case, out)
    exit_distributed()


if __name__ == "__main__":
    main()
