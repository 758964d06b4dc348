"""Sequence sharding of batches: each SP rank keeps its part of every sequence tensor.

All ranks of one SP group receive the *same* samples (the sampler is given the DP layout), so a
batch needs no communication to be sharded: every rank prepares the full batch the same way and
keeps its tokens of dim 1 — slice ``[r*c, (r+1)*c)`` under Ulysses alone; with a ring dimension
the *zigzag* layout of :func:`shard_token_index` (each ring rank holds chunks ``i`` and
``2R-1-i``, so causal attention work is the same on every ring rank). Preparation happens *before*
slicing because two steps need the whole sequence:

* labels are shifted (``shift_labels[t] = labels[t+1]``, -100 at the end): after slicing, the label
  of a shard's last token lives on the next rank;
* position ids are created (``arange``) when missing: a shard cannot know its offset otherwise.

Sequences are right-padded to a multiple of ``pad_to_multiple_of`` (pad tokens get label -100 and
positions continuing the last sequence, so they never change a real token's result); nothing is
truncated. A right-padding ``attention_mask`` is folded into the labels and dropped: HF would
otherwise build an O(c^2) shard-local mask that attention under SP discards anyway.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_ulysses.errors import raise_once

IGNORE_INDEX = -100


def _check_right_padded(attention_mask: Tensor) -> None:
    m = attention_mask.to(torch.int64)
    # right padding <=> each row is non-increasing (1...1 0...0)
    if (m[:, 1:] > m[:, :-1]).any():
        raise ValueError(
            "Sequence parallelism needs right-padded batches, but attention_mask has padding before real tokens "
            "(left padding or holes). Pad on the right (tokenizer.padding_side='right'), or pack sequences and mark "
            "document starts with position_ids that restart at 0."
        )


def prepare_batch(
    batch: Mapping[str, Any],
    pad_to_multiple_of: int,
    pad_token_id: int = 0,
) -> dict[str, Any]:
    """Full-length preparation shared by every rank: labels, shift, positions, padding.

    Returns a new dict with ``input_ids``, ``shift_labels`` and ``position_ids`` (all ``[b, S']``,
    ``S'`` a multiple of ``pad_to_multiple_of``), no ``labels`` (so HF models do not compute a loss of
    their own on a shard) and no ``attention_mask``; other entries are passed through, and other
    ``[b, S, ...]`` tensors are padded with zeros.
    """
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}.")
    out = dict(_checked_mapping(batch))
    input_ids = _checked_input_ids(out.pop("input_ids"))
    b, s = input_ids.shape

    def check_shape(name: str, t: Tensor) -> None:
        if t.shape[:2] != (b, s):
            raise ValueError(f"'{name}' has shape {tuple(t.shape)} but input_ids is {(b, s)}; they must match.")

    shift_labels = _shift_labels(out, input_ids, check_shape)
    attention_mask = out.pop("attention_mask", None)
    if attention_mask is not None:
        check_shape("attention_mask", attention_mask)
        if attention_mask.dim() != 2:
            raise ValueError(
                "Sequence parallelism takes a 2D attention_mask (right padding) only; express other patterns "
                "(packing) through position_ids."
            )
        _check_right_padded(attention_mask)
        shift_labels = shift_labels.masked_fill(attention_mask == 0, IGNORE_INDEX)

    position_ids = out.pop("position_ids", None)
    if position_ids is None:
        position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
    else:
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.shape[0] == 1 and b > 1:
            position_ids = position_ids.expand(b, -1)
        check_shape("position_ids", position_ids)

    pad = (-s) % pad_to_multiple_of
    if pad:
        input_ids = torch.nn.functional.pad(input_ids, (0, pad), value=pad_token_id)
        shift_labels = torch.nn.functional.pad(shift_labels, (0, pad), value=IGNORE_INDEX)
        # continue the last row's positions: pads join the last segment and, being last, affect no one
        tail = position_ids[:, -1:] + torch.arange(1, pad + 1, device=position_ids.device)
        position_ids = torch.cat([position_ids, tail], dim=1)
        for k, v in list(out.items()):
            if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == (b, s):
                out[k] = torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, pad))
    out["input_ids"] = input_ids
    out["shift_labels"] = shift_labels
    out["position_ids"] = position_ids.contiguous()
    return out


def _is_text(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, (list, tuple)) and bool(v) and isinstance(v[0], str))


def _checked_mapping(batch: Any) -> Mapping[str, Any]:
    if torch.is_tensor(batch):
        return {"input_ids": batch}
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"lightning_ulysses expects dict batches with 'input_ids' (and optionally 'labels', 'position_ids', "
            f"'attention_mask'); got {type(batch).__name__}. Return a dict from your dataset or collate_fn."
        )
    if "input_ids" not in batch:
        texts = [k for k, v in batch.items() if _is_text(v)]
        hint = (
            f" The batch holds text ({', '.join(map(repr, texts))}): tokenize it first, e.g. "
            "tokenizer(texts, return_tensors='pt', padding=True) in your collate_fn or with datasets.map."
            if texts else ""
        )
        raise KeyError(
            f"lightning_ulysses needs 'input_ids' (a [batch, seq] tensor of token ids) in every batch; got keys "
            f"{sorted(map(str, batch))}.{hint}"
        )
    return batch


def _checked_input_ids(input_ids: Any) -> Tensor:
    if not torch.is_tensor(input_ids):
        kind = "text" if _is_text(input_ids) else type(input_ids).__name__
        raise TypeError(
            f"'input_ids' must be a [batch, seq] tensor of token ids, got {kind}. Tokenize with return_tensors='pt' "
            "or collate with torch.stack / DataCollatorWithPadding."
        )
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(
            f"'input_ids' must hold integer token ids, got dtype {input_ids.dtype}. Convert with input_ids.long() "
            "(a float tensor usually means features were passed where token ids belong)."
        )
    if input_ids.dim() == 1:
        raise ValueError(
            f"input_ids must be [batch, seq], got one dimension {tuple(input_ids.shape)}; batch your samples with a "
            "DataLoader (batch_size=1 gives [1, seq]) or add .unsqueeze(0)."
        )
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}.")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); the dataloader yielded an empty batch.")
    return input_ids


def _shift_labels(out: dict, input_ids: Tensor, check_shape: Any) -> Tensor:
    """``shift_labels`` as given, or ``labels`` (default: the input ids, padding masked) shifted by one *before*
    sharding: token t predicts labels[t+1]; the last token predicts nothing. Pops both keys from ``out``."""
    if "shift_labels" in out:
        shift_labels = out.pop("shift_labels")
        check_shape("shift_labels", shift_labels)
        if "labels" in out:
            raise ValueError("Pass either 'labels' or 'shift_labels', not both.")
        return shift_labels
    labels = out.pop("labels", None)
    if labels is None:
        labels = input_ids.clone()
    check_shape("labels", labels)
    attention_mask = out.get("attention_mask")
    if attention_mask is not None:
        check_shape("attention_mask", attention_mask)
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def real_token_mask(batch: Any, padded_len: int) -> Tensor:
    """``[b, padded_len]`` bool: the batch's real tokens (its right-padding ``attention_mask``, ones without
    one) followed by ``False`` for the padding :func:`prepare_batch` added."""
    if torch.is_tensor(batch):
        batch = {"input_ids": batch}
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = mask.to(torch.bool) if mask is not None else torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    return torch.nn.functional.pad(real, (0, padded_len - real.shape[1]), value=False)


def uses_zigzag(ring: int, zigzag: bool) -> bool:
    return ring > 1 and zigzag


def shard_multiple(sp: int, ring: int = 1, zigzag: bool = True) -> int:
    """What the sequence length must be a multiple of: ``sp``, or ``2 * sp`` for a zigzag ring."""
    return 2 * sp if uses_zigzag(ring, zigzag) else sp


def shard_token_index(seq_len: int, sp: int, ring: int = 1, zigzag: bool = True) -> Tensor:
    """``[sp, seq_len // sp]``: the global token indices each SP rank holds, in its local order.

    SP rank ``c = ring_rank * ulysses + ulysses_rank``. A ring rank ``i`` owns a *part*: chunk
    ``i`` of ``ring`` (contiguous) or chunks ``i`` and ``2*ring-1-i`` of ``2*ring`` (zigzag,
    :func:`ring_token_index`). Its Ulysses ranks split the part into consecutive pieces, so that the Ulysses
    all-to-all puts the part back together in order. With ``ring == 1`` this is plain contiguous sharding.
    """
    if seq_len % shard_multiple(sp, ring, zigzag) != 0:
        raise ValueError(
            f"Sequence length {seq_len} is not a multiple of {shard_multiple(sp, ring, zigzag)} (sp={sp}, ring={ring}, "
            f"zigzag={zigzag}); call prepare_batch first."
        )
    return ring_token_index(seq_len, ring, zigzag).reshape(sp, -1)  # each ring part split into sp // ring pieces


def ring_token_index(seq_len: int, ring: int, zigzag: bool = True) -> Tensor:
    """``[ring, seq_len // ring]``: the global token indices a ring rank holds after the Ulysses all-to-all (its
    Ulysses group's pieces put back together), in local order: chunk ``i`` of ``ring``, or chunks ``i`` and
    ``2*ring-1-i`` of ``2*ring`` (zigzag). Increasing along each row."""
    idx = torch.arange(seq_len)
    if uses_zigzag(ring, zigzag):
        chunks = idx.view(2 * ring, -1)
        return torch.stack([torch.cat([chunks[i], chunks[2 * ring - 1 - i]]) for i in range(ring)])
    return idx.view(ring, -1)


def shard_batch(
    batch: Mapping[str, Any],
    sp_rank: int,
    sp: int,
    seq_len: Optional[int] = None,
    ring: int = 1,
    zigzag: bool = True,
) -> dict[str, Any]:
    """Keep this rank's tokens (:func:`shard_token_index`) of dim 1 of every ``[b, S, ...]`` tensor.

    Tensors whose dim 1 is not the sequence length (per-sample ids, images...) are kept whole.
    """
    s = seq_len if seq_len is not None else batch["input_ids"].shape[1]
    b = batch["input_ids"].shape[0]
    return {
        k: shard_sequence(v, sp_rank, sp, ring, zigzag) if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == (b, s)
        else v
        for k, v in batch.items()
    }


def shard_sequence(t: Tensor, sp_rank: int, sp: int, ring: int = 1, zigzag: bool = True) -> Tensor:
    """This rank's tokens of one ``[b, S, ...]`` tensor: ``[b, S, ...] -> [b, S/sp, ...]`` (:func:`shard_token_index`)."""
    s = t.shape[1]
    if s % shard_multiple(sp, ring, zigzag) != 0:
        raise ValueError(
            f"Sequence length {s} is not divisible by {shard_multiple(sp, ring, zigzag)} (sp={sp}, ring={ring}); "
            "call prepare_batch first."
        )
    if sp == 1:
        return t
    if not uses_zigzag(ring, zigzag):
        c = s // sp
        return t[:, sp_rank * c : (sp_rank + 1) * c].contiguous()
    return t.index_select(1, shard_token_index(s, sp, ring, zigzag)[sp_rank].to(t.device))


def check_group_agrees(full: Optional[Mapping[str, Any]], error: Optional[Exception], groups: Any,
                       device: torch.device) -> None:
    """All ranks of an SP group must hold the same batch; otherwise the first all-to-all would hang.

    Collective over the SP group of ``groups`` (:class:`~lightning_ulysses.parallel.layout.ProcessGroups`), one
    all-gather of 5 integers per batch: (error flag, batch size, length, key names, token checksum). ``full``: this
    rank's prepared batch, ``None`` with ``error`` when preparing it failed. A rank whose batch failed raises its
    error (reported once); the others stop quietly; batches that differ raise an error that names the fix.
    """
    if full is None or error is not None:
        sig = [1, 0, 0, 0, 0]
    else:
        ids = full["input_ids"]
        keys = zlib.crc32(",".join(sorted(map(str, full))).encode())
        sig = [0, int(ids.shape[0]), int(ids.shape[1]), keys, int(ids.to(torch.int64).sum()) % (2**61)]
    mine = torch.tensor(sig, dtype=torch.int64, device=device)  # [5]
    everyone = [torch.empty_like(mine) for _ in range(groups.sp)]  # sp x [5]
    dist.all_gather(everyone, mine, group=groups.sp_group)
    rows = [t.tolist() for t in everyone]
    group_ranks = groups.layout.sp_group_ranks()[groups.dp_rank]
    failed = [group_ranks[i] for i, r in enumerate(rows) if r[0]]
    if failed:
        if error is None:  # a peer failed on a batch this rank could prepare: stop quietly, it reports
            raise_once(RuntimeError("a batch error on another rank of this SP group"), failed[0], [groups.rank])
        raise_once(error, failed[0], failed)
    if any(r[1:] != rows[0][1:] for r in rows):
        what = ["batch size", "sequence length", "batch keys", "token ids"]
        differs = sorted({what[j] for r in rows for j in range(4) if r[1 + j] != rows[0][1 + j]})
        raise_once(
            ValueError(
                f"The ranks {group_ranks} of one sequence-parallel group received different batches ({', '.join(differs)} "
                "differ). Every rank of an SP group must get the same samples: let Lightning add the "
                "DistributedSampler (use_distributed_sampler=True, the default), or build yours with "
                "trainer.strategy.distributed_sampler_kwargs (num_replicas=dp, rank=dp_rank), and make the data "
                "pipeline deterministic across ranks (same seed, no per-rank randomness)."
            ),
            group_ranks[0],
            group_ranks,
        )


def labelled_index(labels: Tensor) -> Optional[Tensor]:
    """``[k]`` positions of the flat ``labels [n]`` that carry a label (not -100), or None when all ``n`` do: the rows
    a loss or log-prob pass sends through the lm_head (prompts, user turns, padding and vision tokens skip it)."""
    index = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
    return None if index.numel() == labels.numel() else index


def packed_segments(position_ids: Tensor) -> Optional[Tensor]:
    """Segment id per token for packed rows (position ids restart), or None when no row is packed.

    Same rule as transformers' ``find_packed_sequence_indices``: a new segment starts wherever the
    position does not continue the previous one by +1.
    """
    first = position_ids[:, :1] - 1
    seg = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    if bool((seg[:, -1] == 0).all()):
        return None
    return seg


def sharding_multiple(sp: int, ring: int = 1, zigzag: bool = True, pad_to_multiple_of: Optional[int] = None) -> int:
    """What the strategy pads every sequence to a multiple of: ``pad_to_multiple_of`` (checked against what
    sharding needs, :func:`shard_multiple`) or, by default, exactly what sharding needs."""
    need = shard_multiple(sp, ring, zigzag)
    multiple = pad_to_multiple_of or need
    if multiple % need != 0:
        what = f"2 x sequence_parallel_size = {need} (zigzag ring)" if need != sp else f"sequence_parallel_size={sp}"
        raise ValueError(
            f"pad_to_multiple_of={multiple} must be a multiple of {what} so every rank gets an equal shard; use e.g. "
            f"{need * 256} on GPUs."
        )
    return multiple


def prepare_for_sharding(
    batch: Any,
    sp: int,
    pad_to_multiple_of: Optional[int] = None,
    pad_token_id: int = 0,
    ring: int = 1,
    zigzag: bool = True,
) -> dict[str, Any]:
    """:func:`prepare_batch` at the multiple the layout needs."""
    return prepare_batch(batch, sharding_multiple(sp, ring, zigzag, pad_to_multiple_of), pad_token_id)


def shard_for_sequence_parallel(
    batch: Any,
    sp_rank: int,
    sp: int,
    pad_to_multiple_of: Optional[int] = None,
    pad_token_id: int = 0,
    ring: int = 1,
    zigzag: bool = True,
) -> dict[str, Any]:
    """:func:`prepare_for_sharding` then :func:`shard_batch`; ``pad_to_multiple_of`` defaults to :func:`shard_multiple`."""
    full = prepare_for_sharding(batch, sp, pad_to_multiple_of, pad_token_id, ring, zigzag)
    return shard_batch(full, sp_rank, sp, ring=ring, zigzag=zigzag)


def check_token_ids(input_ids: Tensor, vocab_size: Optional[int]) -> None:
    """Refuse token ids the model's embedding has no row for (a tokenizer larger than the model): torch would stop
    with a bare ``index out of range`` (a device-side assert on GPU). Checked on the host copy of the batch."""
    if vocab_size is None or input_ids.device.type != "cpu" or input_ids.numel() == 0:
        return
    largest, smallest = int(input_ids.max()), int(input_ids.min())
    if largest >= vocab_size or smallest < 0:
        bad = largest if largest >= vocab_size else smallest
        raise ValueError(
            f"The batch holds token id {bad}, but the model's embedding has {vocab_size} rows (ids 0..{vocab_size - 1}). "
            "The tokenizer does not match the model: use the model's own tokenizer, or build the model with "
            f"vocab_size >= the tokenizer's size (YAML: model.model.vocab_size; len(tokenizer) tells it)."
        )


__all__ = [
    "check_group_agrees",
    "check_token_ids",
    "IGNORE_INDEX",
    "packed_segments",
    "prepare_batch",
    "prepare_for_sharding",
    "real_token_mask",
    "ring_token_index",
    "shard_batch",
    "shard_for_sequence_parallel",
    "shard_sequence",
    "shard_multiple",
    "sharding_multiple",
    "shard_token_index",
]
