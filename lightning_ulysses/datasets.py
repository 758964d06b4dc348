"""Small, download-free data for the quickstart, tests and benchmarks."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset


class MarkovTokens(Dataset):
    """Long token sequences from a fixed sparse Markov chain (each token has ``branching`` successors).

    Learnable in a few dozen steps (loss falls from ln(V) towards ln(branching)), deterministic per
    index, and of any length, which makes it a good smoke test for long-sequence training.
    """

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, branching: int = 2, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab_size, (vocab_size, branching), generator=g)
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        choices = torch.randint(0, self.successors.shape[1], (self.seq_len,), generator=g)
        tokens = torch.empty(self.seq_len, dtype=torch.long)
        tokens[0] = int(torch.randint(0, self.vocab_size, (1,), generator=g))
        for t in range(1, self.seq_len):
            tokens[t] = self.successors[tokens[t - 1], choices[t]]
        return {"input_ids": tokens}


class SyntheticLMDataModule(LightningDataModule):
    """Train/val loaders over :class:`MarkovTokens`."""

    def __init__(
        self,
        vocab_size: int = 256,
        seq_len: int = 1024,
        num_train_samples: int = 256,
        num_val_samples: int = 8,
        batch_size: int = 1,
        branching: int = 2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train_set = MarkovTokens(hp.num_train_samples, hp.seq_len, hp.vocab_size, hp.branching, hp.seed)
        self.val_set = MarkovTokens(hp.num_val_samples, hp.seq_len, hp.vocab_size, hp.branching, hp.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
