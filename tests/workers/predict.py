"""``trainer.predict`` under the strategy returns the whole sequence's outputs at every layout; rank 0 compares
them with plain transformers on each row alone. ``predict.py CASE_JSON RESULT_JSON``: CASE has sp, mode, ring."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy, build_causal_lm  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402

CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
LENGTHS = (13, 9)


def main() -> None:
    case, result = json.loads(sys.argv[1]), Path(sys.argv[2])
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (2, max(LENGTHS)), generator=g)
    mask = torch.stack([torch.arange(max(LENGTHS)) < n for n in LENGTHS]).long()
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref_model = build_causal_lm(CONFIG).eval()
    errors: dict[str, float] = {}
    shapes: dict[str, list] = {}
    for output in ("logits", "token_logprobs", "last_logits"):
        module = CausalLMModule(model=CONFIG, predict_output=output)
        strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=case["sp"], stage=2,
                                            context_parallel_mode=case.get("mode", "auto"))
        trainer = Trainer(strategy=strategy, accelerator="cpu", devices=case["sp"], logger=False,
                          enable_progress_bar=False, enable_model_summary=False)
        (got,) = trainer.predict(module, DataLoader([batch], batch_size=None))
        shapes[output] = list(got.shape)
        worst = 0.0
        for row, n in enumerate(LENGTHS):
            with torch.no_grad():
                ref = ref_model(input_ids=ids[row : row + 1, :n], use_cache=False).logits[0]
            if output == "logits":
                diff = got[row, :n] - ref
            elif output == "token_logprobs":
                lp = torch.log_softmax(ref[: n - 1], -1).gather(-1, ids[row, 1:n].unsqueeze(-1)).squeeze(-1)
                diff = torch.cat([got[row, : n - 1] - lp, got[row, n - 1 :]])  # masked positions are 0
            else:
                diff = got[row] - ref[n - 1]
            worst = max(worst, float(diff.abs().max()))
        errors[output] = worst
    if trainer.global_rank == 0:
        result.write_text(json.dumps({"errors": errors, "shapes": shapes, "layout": str(strategy.layout)}))
    exit_distributed()


if __name__ == "__main__":
    main()
