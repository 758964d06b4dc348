"""``PreferenceDataModule``: TRL's preference datasets as rows for :class:`lightning_ulysses.PreferenceModule`.

Rows (TRL's formats): ``prompt`` / ``chosen`` / ``rejected`` as strings (plain) or as message lists (conversational,
rendered with the tokenizer's chat template), or ``chosen`` / ``rejected`` conversations alone (implicit prompt: their
common leading messages). Each pair becomes two samples, prompt + chosen and prompt + rejected, whose prompt tokens
carry no label. A pair is never split: packed rows hold whole pairs, chosen then rejected, each sample with position
ids restarting at 0 (the layout ``PreferenceModule`` reads); ``packing="none"`` gives one pair per row. A pair longer
than ``seq_len`` is never cut: ``too_long="error"`` (default) names it, ``"drop"`` leaves it out, counted in the stats
logged at setup.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from lightning_ulysses.data.formats import labels_from_mask, tokenize_sample
from lightning_ulysses.data.modules import _TokenizedDataModule
from lightning_ulysses.data.packing import PackingStats, _row, best_fit_decreasing
from lightning_ulysses.errors import errors_reported_once

PAIR_PACKINGS = ("best_fit", "none")
# TRL's precomputed reference columns (``DPOTrainer(precompute_ref_log_probs=True)``): one float per pair, carried
# into each row as ``[pairs in the row]`` (whole on every SP rank: per-sample values are not sharded)
REF_LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
PAIR_TOO_LONG = ("error", "drop")

Sample = tuple[list[int], list[int]]


class PreferenceDataModule(_TokenizedDataModule):
    """Preference pairs (TRL's formats, see the module docstring) packed into rows of ``seq_len`` tokens.

    Args:
        data, tokenizer, batch_size, val_size, val_data, split, num_proc, seed, num_workers, chat_template, eos_token:
            as :class:`~lightning_ulysses.data.SFTDataModule`.
        seq_len: tokens per row; a pair (chosen + rejected with their prompt twice) must fit.
        packing: ``"best_fit"`` (several whole pairs per row) or ``"none"`` (one pair per row, padded per batch).
        too_long: a pair longer than ``seq_len``: ``"error"`` (default) or ``"drop"`` (counted and logged).

    Data with ``ref_chosen_logps`` / ``ref_rejected_logps`` columns (the reference's summed completion log-probs,
    precomputed) keeps them with their pairs: each row carries the values of its pairs, and
    :class:`~lightning_ulysses.PreferenceModule` uses them instead of running a reference.
    """

    @errors_reported_once
    def __init__(
        self,
        data: Union[str, list[str]],
        tokenizer: Any,
        seq_len: int = 4096,
        packing: str = "best_fit",
        too_long: str = "error",
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
        if packing not in PAIR_PACKINGS:
            raise ValueError(f"packing must be one of {list(PAIR_PACKINGS)} for preference pairs, got {packing!r}.")
        if too_long not in PAIR_TOO_LONG:
            raise ValueError(f"too_long must be one of {list(PAIR_TOO_LONG)} (a pair is never cut), got {too_long!r}.")
        super().__init__(data, tokenizer, seq_len, packing, "drop", 1000, batch_size, val_size, val_data, split,
                         num_proc, seed, num_workers, chat_template, eos_token)
        self.too_long = too_long

    def _prepare_dataset(self, dataset: Any) -> Any:
        missing = {"chosen", "rejected"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"Preference data needs 'chosen' and 'rejected' columns (and 'prompt', or conversations "
                             f"with a common start); missing {sorted(missing)} in {dataset.column_names}.")
        refs = [c for c in REF_LOGP_COLUMNS if c in dataset.column_names]
        if len(refs) == 1:
            raise ValueError(f"Preference data has a '{refs[0]}' column but no "
                             f"'{next(c for c in REF_LOGP_COLUMNS if c not in refs)}': precomputed reference log-probs "
                             "need both (or neither: the module's reference computes them).")
        return dataset

    @staticmethod
    def _reference_of(sample: dict, index: int) -> Optional[tuple[float, float]]:
        if REF_LOGP_COLUMNS[0] not in sample:
            return None
        values = tuple(sample[c] for c in REF_LOGP_COLUMNS)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"Preference sample {index}: {dict(zip(REF_LOGP_COLUMNS, values))}; precomputed reference "
                             "log-probs must be numbers (the reference's summed log-probs of each completion).")
        return float(values[0]), float(values[1])

    def _pair(self, sample: dict) -> tuple[Sample, Sample]:
        prompt, chosen, rejected = sample.get("prompt"), sample["chosen"], sample["rejected"]
        if prompt is None:
            if isinstance(chosen, str):
                raise ValueError("A plain-text pair without a 'prompt' column: add the prompt (TRL's explicit format), "
                                 "or give chosen/rejected as conversations (the common messages are the prompt).")
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = list(chosen[:n]), list(chosen[n:]), list(rejected[n:])
        out = []
        for completion in (chosen, rejected):
            ids, mask = tokenize_sample({"prompt": prompt, "completion": completion}, self.tokenizer, "prompt_completion")
            out.append((ids, labels_from_mask(ids, mask)))
        return out[0], out[1]

    def _rows_of(self, dataset: Any) -> tuple[list[dict], PackingStats]:
        stats = PackingStats()
        pairs: list[tuple[Sample, Sample]] = []
        refs: list[Optional[tuple[float, float]]] = []
        for index, sample in enumerate(dataset):
            stats.samples += 1
            chosen, rejected = self._pair(sample)
            ref = self._reference_of(sample, index)
            length = len(chosen[0]) + len(rejected[0])
            if length > self.seq_len:
                if self.too_long == "error":
                    raise ValueError(
                        f"A preference pair has {length} tokens (chosen {len(chosen[0])} + rejected {len(rejected[0])}, "
                        f"prompt included in each), more than seq_len={self.seq_len}. Raise seq_len, or set "
                        "too_long='drop' (such pairs are left out and counted). A pair is never cut."
                    )
                stats.dropped += 1
                continue
            pairs.append((chosen, rejected))
            refs.append(ref)
        pad = self.tokenizer.pad_token_id
        if self.packing == "none":
            groups = [[i] for i in range(len(pairs))]
            rows = [_row([*pairs[i]], None, pad) for i in range(len(pairs))]
        else:
            groups = [sorted(g) for g in best_fit_decreasing([len(c[0]) + len(r[0]) for c, r in pairs], self.seq_len)]
            rows = [_row([part for i in group for part in pairs[i]], self.seq_len, pad) for group in groups]
        if refs and refs[0] is not None:  # a row's pairs in its order: chosen, rejected of pair 0, then pair 1, ...
            for row, group in zip(rows, groups):
                row[REF_LOGP_COLUMNS[0]] = [refs[i][0] for i in group]
                row[REF_LOGP_COLUMNS[1]] = [refs[i][1] for i in group]
        stats.rows = len(rows)
        stats.real_tokens = sum(len(c[0]) + len(r[0]) for c, r in pairs)
        stats.row_tokens = sum(len(r["input_ids"]) for r in rows) if self.packing != "none" else stats.real_tokens
        return rows, stats


__all__ = ["PAIR_PACKINGS", "PAIR_TOO_LONG", "REF_LOGP_COLUMNS", "PreferenceDataModule"]
