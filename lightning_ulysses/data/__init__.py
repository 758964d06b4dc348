"""Data for training: SFT and pretraining data modules over Hugging Face ``datasets`` (:mod:`.modules`), preference
pairs (:mod:`.preference`), conversations with images for vision-language models (:mod:`.multimodal`), sample
formats and loss masks (:mod:`.formats`), packing (:mod:`.packing`), tokenizers (:mod:`.tokenizer`), and the
synthetic data module of the quickstart (:mod:`.synthetic`). Batch preparation and sharding for SP is the parallel
core's (:mod:`lightning_ulysses.parallel.sharding`); its functions are re-exported here."""

from lightning_ulysses.data.modules import PretrainDataModule, SFTDataModule
from lightning_ulysses.data.multimodal import MultimodalSFTDataModule
from lightning_ulysses.data.packing import PackingStats, pack
from lightning_ulysses.data.preference import PreferenceDataModule
from lightning_ulysses.data.synthetic import MarkovTokens, SyntheticLMDataModule
from lightning_ulysses.parallel.sharding import IGNORE_INDEX, prepare_batch, shard_batch, shard_for_sequence_parallel

__all__ = ["IGNORE_INDEX", "MarkovTokens", "MultimodalSFTDataModule", "PackingStats", "PreferenceDataModule", "PretrainDataModule", "SFTDataModule",
           "SyntheticLMDataModule", "pack", "prepare_batch", "shard_batch", "shard_for_sequence_parallel"]
