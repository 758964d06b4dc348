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

    def __init__(
        self, num_samples: int, seq_len: int, vocab_size: int, branching: int = 2, seed: int = 0, offset: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab_size, (vocab_size, branching), generator=g)
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed
        self.offset = offset  # sample i is walk `offset + i` of the chain: splits never share a walk

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + idx)
        choices = torch.randint(0, self.successors.shape[1], (self.seq_len,), generator=g)
        tokens = torch.empty(self.seq_len, dtype=torch.long)
        tokens[0] = int(torch.randint(0, self.vocab_size, (1,), generator=g))
        for t in range(1, self.seq_len):
            tokens[t] = self.successors[tokens[t - 1], choices[t]]
        return {"input_ids": tokens}


class SyntheticLMDataModule(LightningDataModule):
    """Train/val/test/predict loaders over :class:`MarkovTokens`: one chain (the language), disjoint walks
    per split, so validation measures what training learns."""

    def __init__(
        self,
        vocab_size: int = 256,
        seq_len: int = 1024,
        num_train_samples: int = 256,
        num_val_samples: int = 8,
        num_test_samples: int = 8,
        batch_size: int = 1,
        branching: int = 2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def setup(self, stage: str) -> None:
        hp = self.hparams

        def split(n: int, offset: int) -> MarkovTokens:
            return MarkovTokens(n, hp.seq_len, hp.vocab_size, hp.branching, hp.seed, offset=offset)

        self.train_set = split(hp.num_train_samples, 0)
        self.val_set = split(hp.num_val_samples, hp.num_train_samples)
        self.test_set = split(hp.num_test_samples, hp.num_train_samples + hp.num_val_samples)

    def _loader(self, dataset: Optional[Dataset], shuffle: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
