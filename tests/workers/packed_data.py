"""The data modules' own packed rows through the strategy vs each sample trained on its own (issue #17).

``packed_data.py CASES_JSON OUT_DIR``: each case ``{module: sft|pretrain, data, stage, sp, ring, seq_len,
batch_size, steps}`` builds the data module on the shipped data and tokenizer (best-fit packing: several samples per row,
positions restarting per sample, padding), fits a tiny Llama with plain SGD under the strategy (world = sp, dp=1),
and on rank 0 trains a plain transformers model from the same init on the same batches with every packed sample
run *as its own sequence* (the loss: the token mean over all label tokens of the batch). Packing is right when
both give the same loss every step and the same final weights. Rank 0 writes ``OUT_DIR/<name>.json``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy  # noqa: E402
from lightning_ulysses.data import PretrainDataModule, SFTDataModule  # noqa: E402
from lightning_ulysses.data.modules import collate_rows  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LR = 0.5


def _config(vocab: int) -> dict:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


def _weights(model) -> dict:
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.initial: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = _weights(pl_module.model)  # the reference starts from the same weights

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def _segments(row_ids, row_labels, row_pos, row_mask):
    """(ids, labels, positions) of each sample packed into a row (a new sample where the position restarts)."""
    n = int(row_mask.sum()) if row_mask is not None else row_ids.shape[0]
    starts = [i for i in range(n) if int(row_pos[i]) == 0] + [n]
    return [(row_ids[a:b], row_labels[a:b], row_pos[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def reference(model, batches) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in batches:
        total, count = 0.0, 0
        mask = batch.get("attention_mask")
        for r in range(batch["input_ids"].shape[0]):
            for ids, labels, pos in _segments(batch["input_ids"][r], batch["labels"][r], batch["position_ids"][r],
                                             None if mask is None else mask[r]):
                logits = model(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0]
                target = labels[1:]
                valid = target != -100
                if valid.any():
                    total = total + torch.nn.functional.cross_entropy(logits[:-1][valid], target[valid], reduction="sum")
                    count += int(valid.sum())
        loss = total / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def run(name: str, case: dict, out: Path) -> None:
    kind = SFTDataModule if case["module"] == "sft" else PretrainDataModule
    dm = kind(str(ROOT / "data" / case["data"]), str(ROOT / "data" / "tokenizer"), seq_len=case["seq_len"],
              batch_size=case["batch_size"], val_size=0)
    dm.setup("fit")
    collate = functools.partial(collate_rows, pad_id=dm.tokenizer.pad_token_id)
    n, total = case["steps"] * case["batch_size"], len(dm._rows["train"])
    # "last": the rows best-fit packed last (documents split to seq_len fill the first rows one piece each)
    picks = range(total - n, total) if case.get("rows") == "last" else case.get("rows", range(n))
    rows = [dm._rows["train"][i] for i in picks]
    batches = [collate(rows[i : i + case["batch_size"]]) for i in range(0, len(rows), case["batch_size"])]
    config = _config(len(dm.tokenizer))
    torch.manual_seed(0)
    module = CausalLMModule(model=config, optimizer=lambda p: torch.optim.SGD(p, lr=LR))
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=case["sp"], stage=case["stage"], ring_size=case.get("ring"),
                                        config={"zero_optimization": {"stage": case["stage"]},
                                                "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
                                                "train_micro_batch_size_per_gpu": case["batch_size"]})
    losses = Losses()
    # dp=1: every rank reads every batch, in order (Lightning's distributed sampler would shuffle the training data)
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=case["sp"], max_steps=case["steps"], logger=False,
                      callbacks=[losses], use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    loader = DataLoader(rows, batch_size=case["batch_size"], shuffle=False, collate_fn=collate)
    trainer.fit(module, train_dataloaders=loader)
    trained = _weights(module.model)
    if trainer.global_rank == 0:
        from transformers import AutoConfig, AutoModelForCausalLM

        spec = dict(config)
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec),
                                                 attn_implementation="sdpa")
        plain.load_state_dict(losses.initial)
        ref = reference(plain.train(), batches)
        segments = [len(_segments(b["input_ids"][r], b["labels"][r], b["position_ids"][r], None))
                    for b in batches for r in range(b["input_ids"].shape[0])]
        max_diff = max(float((trained[k] - v).abs().max()) for k, v in plain.state_dict().items())
        (out / f"{name}.json").write_text(json.dumps(
            {"losses": losses.losses, "reference": ref, "max_weight_diff": max_diff, "samples_per_row": segments,
             "padded_tokens": sum(int((b["labels"] == -100).sum()) for b in batches)}))


def main() -> None:
    cases, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    for name, case in cases.items():
        run(name, case, out)
    exit_distributed()


if __name__ == "__main__":
    main()
