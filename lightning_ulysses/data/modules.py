"""LightningDataModules from your data to long-context training: SFT (``messages``, ``prompt``/``completion``,
``text``) and long-document pretraining, from Hugging Face ``datasets``, packed (:mod:`.packing`).

Both read local ``json``/``jsonl``/``parquet``/``arrow``/``csv`` files, a directory saved with
``Dataset.save_to_disk``, or a hub dataset name (where the network allows); tokenize with ``datasets.map``
(batched, ``num_proc`` workers, cached next to the data); hold out a validation split; pack rows of ``seq_len``
tokens with no attention or prediction across samples. Every rank builds the same rows in the same order (the
strategy's sampler then gives all ranks of an SP group the same samples).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_ulysses.data.formats import FORMATS, detect_format, labels_from_mask, tokenize_sample
from lightning_ulysses.data.packing import IGNORE_INDEX, PACKINGS, TOO_LONG, PackingStats, pack
from lightning_ulysses.data.tokenizer import load_tokenizer
from lightning_ulysses.errors import errors_reported_once

_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def load_data(data: Union[str, list[str]], split: str = "train") -> Any:
    """A ``datasets.Dataset`` from files, a saved dataset directory or a hub name."""
    import datasets

    paths = [data] if isinstance(data, str) else list(data)
    first = Path(paths[0])
    if first.is_dir() and ((first / "dataset_dict.json").exists() or (first / "state.json").exists()):
        loaded = datasets.load_from_disk(str(first))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if first.suffix in _FILE_TYPES:
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"data file(s) not found: {missing}")
        empty = [p for p in paths if Path(p).stat().st_size == 0]
        if empty:
            raise ValueError(f"data file(s) {empty} are empty: give files with one sample per line (.jsonl) or row.")
        return datasets.load_dataset(_FILE_TYPES[first.suffix], data_files=paths, split="train")
    return datasets.load_dataset(str(data), split=split)


class RowsDataset(Dataset):
    """Rows of ``input_ids`` / ``labels`` / ``position_ids`` (lists) -> tensors; other entries are per-sample values
    (e.g. a preference row's precomputed reference log-probs: floats stay float64)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.float64 if v and isinstance(v[0], float) else torch.long)
                for k, v in self.rows[i].items()}


def collate_rows(batch: list[dict[str, torch.Tensor]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Stack rows, right-padding to the longest (a multiple of ``pad_to_multiple_of``) with ``attention_mask``.
    Per-sample entries (shorter than their row's tokens: one value per packed sample) are padded with zeros to the
    most samples of a row, never to the token length (the strategy would shard them as a sequence)."""
    longest = max(r["input_ids"].shape[0] for r in batch)
    n = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    out: dict[str, torch.Tensor] = {}
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    for key in batch[0]:
        rows = []
        if key not in ("input_ids", "labels", "position_ids"):
            samples = max(r[key].shape[0] for r in batch)
            if all(r[key].shape[0] < r["input_ids"].shape[0] for r in batch):
                out[key] = torch.stack([torch.nn.functional.pad(r[key], (0, samples - r[key].shape[0])) for r in batch])
                continue
        for r in batch:
            v = r[key]
            pad = n - v.shape[0]
            if key == "position_ids":
                tail = torch.arange(1, pad + 1) + (v[-1] if v.numel() else -1)
                rows.append(torch.cat([v, tail]))
            else:
                rows.append(torch.nn.functional.pad(v, (0, pad), value=fill.get(key, 0)))
        out[key] = torch.stack(rows)
    if any(r["input_ids"].shape[0] != n for r in batch):
        out["attention_mask"] = torch.stack(
            [torch.arange(n) < r["input_ids"].shape[0] for r in batch]
        ).long()
    return out


class _TokenizedDataModule(LightningDataModule):
    """Shared pipeline: load -> split -> tokenize (``datasets.map``) -> pack -> loaders."""

    @errors_reported_once
    def __init__(
        self,
        data: Union[str, list[str]],
        tokenizer: Any,
        seq_len: int = 4096,
        packing: str = "best_fit",
        too_long: str = "split",
        pack_buffer: int = 1000,
        batch_size: int = 1,
        val_size: Union[int, float] = 0.05,
        val_data: Optional[Union[str, list[str]]] = None,
        split: str = "train",
        num_proc: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
        chat_template: Optional[str] = None,
        eos_token: Optional[str] = None,
    ) -> None:
        super().__init__()
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {list(PACKINGS)}, got {packing!r}.")
        if too_long not in TOO_LONG:
            raise ValueError(f"too_long must be one of {list(TOO_LONG)}, got {too_long!r}.")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 tokens, got {seq_len}.")
        self.data, self.val_data, self.split = data, val_data, split
        self.tokenizer_spec, self.chat_template, self.eos_token = tokenizer, chat_template, eos_token
        self.seq_len, self.packing, self.too_long, self.pack_buffer = seq_len, packing, too_long, pack_buffer
        self.batch_size, self.val_size, self.num_proc, self.seed = batch_size, val_size, num_proc, seed
        self.num_workers = num_workers
        self.tokenizer: Any = None
        self.stats: dict[str, PackingStats] = {}
        self._rows: dict[str, RowsDataset] = {}

    # ---- what subclasses define: one sample -> (input_ids, loss mask)
    def _prepare_dataset(self, dataset: Any) -> Any:
        return dataset

    def _tokenize(self, sample: dict) -> tuple[list[int], list[int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _encode(self, dataset: Any) -> list[tuple[list[int], list[int]]]:
        def encode(batch: dict) -> dict:
            ids, labels = [], []
            for i in range(len(next(iter(batch.values())))):
                s_ids, mask = self._tokenize({k: v[i] for k, v in batch.items()})
                ids.append(s_ids)
                labels.append(labels_from_mask(s_ids, mask))
            return {"input_ids": ids, "labels": labels}

        encoded = dataset.map(encode, batched=True, num_proc=self.num_proc, remove_columns=dataset.column_names,
                              desc="lightning_ulysses: tokenizing")
        return list(zip(encoded["input_ids"], encoded["labels"]))

    def _rows_of(self, dataset: Any) -> tuple[list[dict], PackingStats]:
        """Tokenized, packed rows of a split and their stats."""
        return pack(self._encode(dataset), self.seq_len, self.tokenizer.pad_token_id, self.packing, self.too_long,
                    self.pack_buffer)

    @errors_reported_once  # every rank reads the same files: one report
    def setup(self, stage: str) -> None:
        if self._rows:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_spec, self.chat_template, eos_token=self.eos_token)
        train = self._prepare_dataset(load_data(self.data, self.split))
        if self.val_data is not None:
            val = self._prepare_dataset(load_data(self.val_data, self.split))
        elif self.val_size:
            parts = train.train_test_split(test_size=self.val_size, seed=self.seed, shuffle=True)
            train, val = parts["train"], parts["test"]
        else:
            val = None
        for name, ds in (("train", train), ("val", val)):
            if ds is None:
                continue
            rows, stats = self._rows_of(ds)
            if not rows:
                raise ValueError(f"The {name} split has no sample left (too_long={self.too_long!r} dropped all?).")
            self._rows[name], self.stats[name] = RowsDataset(rows), stats
            rank_zero_info(f"lightning_ulysses {type(self).__name__} {name}: {stats.describe()} (packing={self.packing!r})")

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        return DataLoader(self._rows[name], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=functools.partial(collate_rows, pad_id=pad))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> Any:
        return self._loader("val", shuffle=False) if "val" in self._rows else []


class SFTDataModule(_TokenizedDataModule):
    """Supervised fine-tuning data: ``messages`` conversations, ``prompt``/``completion`` pairs or ``text``.

    Args:
        data: data file(s) (``.json``/``.jsonl``/``.parquet``/``.arrow``/``.csv``), a ``save_to_disk`` directory or a
            hub dataset name.
        tokenizer: hub name or local directory (``AutoTokenizer``), a ``tokenizer.json`` path, or a tokenizer object.
        seq_len: tokens per row (packed) or the longest row (unpacked).
        format: ``"auto"`` (from the columns), ``"messages"``, ``"prompt_completion"`` or ``"text"``.
        assistant_only_loss: with ``messages``, only assistant turns are labels (default); ``False``: every token.
        completion_only_loss: with ``prompt``/``completion``, only the completion is a label (default).
        packing: ``"best_fit"`` (default), ``"concat"`` or ``"none"`` (:mod:`lightning_ulysses.data.packing`).
        too_long: samples longer than ``seq_len``: ``"split"`` (default), ``"drop"`` or ``"error"``; counted and logged.
        pack_buffer: samples per best-fit buffer.
        batch_size: rows per batch (per DP group).
        val_size: held-out share (float) or count (int) of the data, or 0; ``val_data`` gives a separate file instead.
        split: dataset split to read (hub datasets / saved ``DatasetDict``).
        num_proc: ``datasets.map`` worker processes for tokenizing.
        seed: seed of the validation split (the training order is the sampler's).
        chat_template: a Jinja template (string or file) replacing the tokenizer's.
        eos_token: the token that ends every sample, when the tokenizer names none (a bare ``tokenizer.json``) or
            another one should be used; must be a token of the tokenizer's vocabulary.
    """

    @errors_reported_once
    def __init__(
        self,
        data: Union[str, list[str]],
        tokenizer: Any,
        seq_len: int = 4096,
        format: str = "auto",  # noqa: A002
        assistant_only_loss: bool = True,
        completion_only_loss: bool = True,
        packing: str = "best_fit",
        too_long: str = "split",
        pack_buffer: int = 1000,
        batch_size: int = 1,
        val_size: Union[int, float] = 0.05,
        val_data: Optional[Union[str, list[str]]] = None,
        split: str = "train",
        num_proc: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
        chat_template: Optional[str] = None,
        eos_token: Optional[str] = None,
    ) -> None:
        super().__init__(data, tokenizer, seq_len, packing, too_long, pack_buffer, batch_size, val_size, val_data, split,
                         num_proc, seed, num_workers, chat_template, eos_token)
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"format must be 'auto' or one of {list(FORMATS)}, got {format!r}.")
        self.format = format
        self.assistant_only_loss, self.completion_only_loss = assistant_only_loss, completion_only_loss
        self._format: Optional[str] = None

    def _prepare_dataset(self, dataset: Any) -> Any:
        fmt = detect_format(dataset.column_names, self.format)
        if self._format is None:
            self._format = fmt
            rank_zero_info(f"lightning_ulysses SFTDataModule: format {fmt!r}")
        return dataset

    def _tokenize(self, sample: dict) -> tuple[list[int], list[int]]:
        return tokenize_sample(sample, self.tokenizer, self._format, self.assistant_only_loss, self.completion_only_loss)


class PretrainDataModule(_TokenizedDataModule):
    """Long-document pretraining data: a ``text`` column, EOS after every document, every token a label.

    ``packing="concat"``: documents concatenated and cut into rows of ``seq_len`` (a document that does not fit
    continues in the next row, as a new segment); ``"best_fit"`` (default): whole documents (split at ``seq_len``
    when longer, ``too_long``) packed best-fit; ``"none"``: one document per row. Attention never crosses a
    document boundary. Other arguments: :class:`SFTDataModule`'s.
    """

    @errors_reported_once
    def __init__(
        self,
        data: Union[str, list[str]],
        tokenizer: Any,
        seq_len: int = 4096,
        text_column: str = "text",
        packing: str = "best_fit",
        too_long: str = "split",
        pack_buffer: int = 1000,
        batch_size: int = 1,
        val_size: Union[int, float] = 0.05,
        val_data: Optional[Union[str, list[str]]] = None,
        split: str = "train",
        num_proc: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
        eos_token: Optional[str] = None,
    ) -> None:
        super().__init__(data, tokenizer, seq_len, packing, too_long, pack_buffer, batch_size, val_size, val_data, split,
                         num_proc, seed, num_workers, eos_token=eos_token)
        self.text_column = text_column

    def _prepare_dataset(self, dataset: Any) -> Any:
        if self.text_column not in dataset.column_names:
            raise ValueError(
                f"PretrainDataModule reads documents from the column {self.text_column!r}; the dataset has "
                f"{dataset.column_names}. Set text_column=..."
            )
        return dataset

    def _tokenize(self, sample: dict) -> tuple[list[int], list[int]]:
        return tokenize_sample({"text": sample[self.text_column]}, self.tokenizer, "text")


__all__ = ["PretrainDataModule", "RowsDataset", "SFTDataModule", "collate_rows", "load_data"]
