"""Multi-process worker for bad-input tests: batches that differ between the ranks of an SP group, text
where token ids belong, and batches with nothing to predict. Writes what it saw to OUT_JSON on rank 0."""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_ulysses  # noqa: E402,F401
from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402
from tests.workers.parity import build_model  # noqa: E402


def batches(mode: str, rank: int) -> list:
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 96, (16,), generator=g) for _ in range(4)]
    if mode == "rank_dependent":  # the bug of a per-rank sampler: SP ranks read different samples
        return [{"input_ids": ids[(i + rank) % 4]} for i in range(4)]
    if mode == "text":
        return [{"text": "a long document"} for _ in range(4)]
    if mode == "nothing_to_predict":
        labels_ignored = {"input_ids": ids[0], "labels": torch.full((16,), -100)}
        one_token = {"input_ids": ids[1][:1]}
        return [labels_ignored, {"input_ids": ids[2]}, one_token, {"input_ids": ids[3]}]
    raise ValueError(mode)


def main() -> None:
    case, out = json.loads(sys.argv[1]), sys.argv[2]
    warnings.simplefilter("default")
    rank = int(os.environ["RANK"])
    data = batches(case["mode"], rank)
    loader = DataLoader([{k: (v.unsqueeze(0) if torch.is_tensor(v) else [v]) for k, v in b.items()} for b in data],
                        batch_size=None, shuffle=False)
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=2, stage=2, timeout=600,
                                        config={"zero_allow_untested_optimizer": True, "train_micro_batch_size_per_gpu": 1})
    module = CausalLMModule(model=build_model({"heads": 4, "kv_heads": 2}), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=case["mode"] != "rank_dependent", callbacks=[Record()])
    trainer.fit(module, train_dataloaders=loader)
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "empty_batches": strategy.empty_batches}, f)
    exit_distributed()


if __name__ == "__main__":
    main()
