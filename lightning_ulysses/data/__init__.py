"""Data for training: the synthetic data module (:mod:`.synthetic`). Batch preparation and sharding for SP is the
parallel core's (:mod:`lightning_ulysses.parallel.sharding`); its functions are re-exported here."""

from lightning_ulysses.data.synthetic import MarkovTokens, SyntheticLMDataModule
from lightning_ulysses.parallel.sharding import IGNORE_INDEX, prepare_batch, shard_batch, shard_for_sequence_parallel

__all__ = ["IGNORE_INDEX", "MarkovTokens", "SyntheticLMDataModule", "prepare_batch", "shard_batch",
           "shard_for_sequence_parallel"]
