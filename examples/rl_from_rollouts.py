"""An RL-style update from stored rollouts under sequence parallelism: a clipped policy-gradient loss (PPO / GRPO's
surrogate) on token log-probs, each rank holding part of every sequence.

Generation is out of scope: an inference engine (vLLM, SGLang, ...) produces the rollouts and their log-probs; this
script only stands in for it (``make_rollouts``: random completions scored by a toy reward, advantages normalised per
prompt, old log-probs from the starting policy). What a rollout row holds, all ``[S]`` and aligned with the *shifted*
labels (position ``t`` is about predicting token ``t + 1``, as the strategy's ``shift_labels``):

* ``input_ids``: prompt + completion; ``labels``: -100 on the prompt, the completion's tokens otherwise;
* ``advantages``: the sample's advantage on each of its completion positions; ``old_logprobs``: the log-prob the
  sampling policy gave each completion token.

The loss, per completion token: ``-min(r A, clip(r, 1 - eps, 1 + eps) A)`` with ``r = exp(logp - old_logp)``, averaged
over the completion tokens of the whole sequences (SP group) -- ``token_logprobs`` computes ``logp`` through the
lm_head in tiles, ``normalize_sp_loss`` takes the SP token mean.

Runs on CPU (2 processes, gloo) or GPUs:  python examples/rl_from_rollouts.py --devices 2
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy, exit_distributed, token_logprobs
from lightning_ulysses.parallel.loss import normalize_sp_loss

MODEL = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


class ClippedPolicyGradient(CausalLMModule):
    """``CausalLMModule`` with the clipped surrogate loss of stored rollouts (see the module docstring)."""

    def __init__(self, clip: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clip = clip

    def compute_loss(self, batch):
        batch = self._prepare(batch)  # under the strategy: already this rank's shard, shift_labels [b, S/sp]
        labels = batch["shift_labels"]
        hidden = self.model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                          use_cache=False).last_hidden_state
        logp, entropy = token_logprobs(hidden, labels, self.model.get_output_embeddings(), entropy=True)
        valid = labels != -100
        ratio = torch.exp(logp - batch["old_logprobs"].to(logp))
        adv = batch["advantages"].to(logp)
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - self.clip, 1 + self.clip) * adv)
        self._entropy = normalize_sp_loss((entropy * valid).sum().detach(), labels)
        return normalize_sp_loss(-(surrogate * valid).sum(), labels), batch

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("entropy", self._entropy, sync_dist=True, batch_size=1)
        return loss


@torch.no_grad()
def make_rollouts(module: CausalLMModule, prompts: int, samples: int, prompt_len: int, completion_len: int) -> list:
    """Stands in for an inference engine: random completions, a toy reward (the share of even tokens), advantages
    normalised per prompt (GRPO), and the starting policy's log-probs of the completion tokens."""
    g = torch.Generator().manual_seed(0)
    module.configure_model()
    model = module.model.eval()
    rows = []
    for _ in range(prompts):
        prompt = torch.randint(0, 128, (prompt_len,), generator=g)
        completions = torch.randint(0, 128, (samples, completion_len), generator=g)
        reward = (completions % 2 == 0).float().mean(1)
        adv = (reward - reward.mean()) / (reward.std() + 1e-6)
        for completion, a in zip(completions, adv):
            ids = torch.cat([prompt, completion])
            shifted = torch.cat([ids[1:], torch.tensor([-100])])  # label of position t = token t + 1
            shifted[: prompt_len - 1] = -100  # positions whose next token is still the prompt
            logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
            old = torch.log_softmax(logits, -1).gather(-1, shifted.clamp(min=0)[:, None])[:, 0] * (shifted != -100)
            labels = torch.cat([torch.full((prompt_len,), -100), completion])
            rows.append({"input_ids": ids, "labels": labels, "old_logprobs": old,
                         "advantages": a * (shifted != -100).float()})
    model.train()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--completion-len", type=int, default=96)
    args = p.parse_args()
    L.seed_everything(0)
    module = ClippedPolicyGradient(model=MODEL, attn_implementation="sdpa",
                                   optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    rollouts = make_rollouts(module, prompts=8, samples=4, prompt_len=32, completion_len=args.completion_len)
    trainer = L.Trainer(accelerator="auto", devices=args.devices, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        strategy=UlyssesDeepSpeedStrategy(sequence_parallel_size="auto", stage=2))
    trainer.fit(module, DataLoader(rollouts, batch_size=2, shuffle=True))
    if trainer.is_global_zero:
        print(f"layout: {trainer.strategy.layout.describe()}; final train_loss "
              f"{float(trainer.callback_metrics['train_loss']):.4f}, entropy {float(trainer.callback_metrics['entropy']):.4f}")
    exit_distributed()


if __name__ == "__main__":
    main()
