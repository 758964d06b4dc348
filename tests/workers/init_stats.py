"""Worker: a model built from a config dict (pad token set) inside the strategy under ZeRO-3, sp=2.

Records, at the start of training, whether every parameter is partitioned (no rank holds the whole model) and,
gathered, each parameter's mean/std on every rank; rank 0 adds a plain ``from_config`` with the same seed.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_ulysses  # noqa: E402,F401
from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402
from lightning_ulysses.lightning.module import build_causal_lm  # noqa: E402

SPEC = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False, "pad_token_id": 0,
        "initializer_range": 0.02}


def stats(params: dict) -> dict:
    return {n: [float(p.float().mean()), float(p.float().std())] for n, p in params.items()}


class Probe(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        import deepspeed

        params = dict(pl_module.model.named_parameters())
        self.partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            self.stats = stats(params)
            self.pad_row = float(params["model.embed_tokens.weight"][0].abs().sum())
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def main() -> None:
    out = sys.argv[2]
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 96, (16,), generator=g)} for _ in range(2)]
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=2, stage=3,
                                        config={"zero_allow_untested_optimizer": True, "train_micro_batch_size_per_gpu": 1,
                                                # partition even tiny parameters (default: < 1e5 elements stay whole)
                                                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    probe = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    trainer.fit(CausalLMModule(SPEC, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), seed=0), DataLoader(data, batch_size=1))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"stats": probe.stats, "partitioned": probe.partitioned, "losses": probe.losses, "pad_row": probe.pad_row})
    if dist.get_rank() == 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            plain = build_causal_lm(dict(SPEC))
        with open(out, "w") as f:
            json.dump({"ranks": everyone, "plain": stats(dict(plain.named_parameters()))}, f)
    exit_distributed()


if __name__ == "__main__":
    main()
