"""Preference training under SP, several cases in one launched job.

``preference.py CASES_JSON OUT_DIR``: each case fits a :class:`PreferenceModule` on ``data/preferences.jsonl`` with
plain SGD and writes, from rank 0, ``OUT_DIR/<name>.json``: the full batches it trained on (before sharding), the
losses and metrics of every step, the initial weights and the final trainable weights. ``tests/test_preference.py`` replays the batches
through plain single-process transformers and compares.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_ulysses import DistillationModule, PreferenceModule, UlyssesDeepSpeedStrategy  # noqa: E402
from lightning_ulysses.checkpoint.weights import gather_weights  # noqa: E402
from lightning_ulysses.data import PreferenceDataModule  # noqa: E402
from lightning_ulysses.memory.tiled_mlp import tiled_mlp_enabled  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LLAMA = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
LR = 0.5


class Record(L.Callback):
    def __init__(self) -> None:
        self.batches, self.losses, self.metrics = [], [], []
        self.initial = None
        self.companion_tiled = None

    def on_fit_start(self, trainer, pl_module) -> None:
        # the weights training starts from (ZeRO-3 initialises partitions, a different random stream than a plain
        # build with the same seed); every rank takes part in the gather, rank 0 keeps them
        self.initial = gather_weights(pl_module.model)

    def on_before_batch_transfer_hook(self, batch) -> None:
        self.batches.append({k: v.tolist() for k, v in batch.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        companion = companion_of(pl_module)
        self.companion_tiled = tiled_mlp_enabled(companion) if companion is not None else None
        self.metrics.append({k: float(v) for k, v in pl_module.step_metrics.items()})


class _RecordsBatches:
    """Records the full batch before the strategy shards it (Lightning's hook sees whole batches)."""

    recorder: Record

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            self.recorder.on_before_batch_transfer_hook(batch)
        return batch


class Recorded(_RecordsBatches, PreferenceModule):
    pass


class RecordedDistillation(_RecordsBatches, DistillationModule):
    pass


def companion_of(module):
    """The frozen model of its own (a DPO reference, a teacher), if any."""
    ref = getattr(module, "ref_model", None)
    return ref if ref is not None else getattr(module, "teacher", None)


def teacher():
    """A teacher unlike the student: the same shape, other weights (seed 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(LLAMA)
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec),
                                            attn_implementation="sdpa")


def run(case: dict, out: Path) -> None:
    torch.manual_seed(0)
    rec = Record()
    sgd = lambda p: torch.optim.SGD(p, lr=LR)  # noqa: E731
    if case["loss"] in ("forward_kl", "reverse_kl", "jsd"):
        module = RecordedDistillation(LLAMA, teacher(), divergence=case["loss"], ce_weight=case.get("ce_weight", 0.0),
                                      temperature=case.get("temperature", 1.0), attn_implementation="sdpa",
                                      optimizer=sgd, logprob_tile_tokens=case.get("tile", 16))
    else:
        module = Recorded(LLAMA, loss_type=case["loss"], beta=case.get("beta", 0.1), attn_implementation="sdpa",
                          optimizer=sgd, peft=case.get("peft"), precomputed_ref_logps=bool(case.get("precomputed")),
                          **({"logprob_tile_tokens": case["tile"]} if "tile" in case else {}))
    module.recorder = rec
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=case["sp"], stage=case["stage"],
                                        loss_normalization=case.get("normalization", "batch_mean"),
                                        gradient_checkpointing=case.get("checkpointing"),
                                        context_parallel_mode=case.get("mode", "auto"),
                                        **({"tiled_mlp": True, "tiled_mlp_tile_tokens": 5} if case.get("tiled_mlp") else {}))
    data = PreferenceDataModule(case.get("data", str(ROOT / "data" / "preferences.jsonl")), str(ROOT / "data" / "tokenizer"), seq_len=128,
                                packing=case.get("packing", "best_fit"), batch_size=1, val_size=0)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=case.get("devices", 2), max_steps=3, logger=False,
                        accumulate_grad_batches=case.get("accumulate", 1),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[rec])
    trainer.fit(module, data)
    weights = gather_weights(module.model)
    ref = getattr(module, "ref_model", None)
    ref_weights = gather_weights(ref) if ref is not None else None
    # every rank's batches: with dp > 1 the step's gradient is the mean over the DP groups' batches
    everyone = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, rec.batches)
    sp = trainer.strategy.layout.sp
    if trainer.global_rank == 0:
        trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
        result = {"batches": rec.batches, "losses": rec.losses, "metrics": rec.metrics,
                  "dp_batches": everyone[::sp],
                  "weights": {k: v.tolist() for k, v in weights.items() if k in trained},
                  "initial": {k: v.tolist() for k, v in rec.initial.items()},
                  "ref_final": {k: v.tolist() for k, v in ref_weights.items()} if ref_weights is not None else None,
                  "layout": trainer.strategy.layout.describe(),
                  "ref_is_submodule": getattr(module, "ref_model", None) is not None,
                  # during fit (the last step) and after it
                  "companion_tiled": None if companion_of(module) is None
                  else [rec.companion_tiled, tiled_mlp_enabled(companion_of(module))],
                  "ref_partitioned": any(hasattr(p, "ds_id") for m in (getattr(module, "ref_model", None),
                                                                        getattr(module, "teacher", None))
                                         if m is not None for p in m.parameters())}
        (out / f"{case['name']}.json").write_text(json.dumps(result))


def main() -> None:
    cases, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    for case in cases:
        run(case, out)
    exit_distributed()


if __name__ == "__main__":
    main()
