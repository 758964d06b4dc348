"""Batch preparation and sharding: shift before shard, positions, padding (never truncation), errors."""

from __future__ import annotations

import pytest
import torch

from lightning_ulysses.parallel.sharding import (
    IGNORE_INDEX,
    prepare_batch,
    shard_batch,
    shard_for_sequence_parallel,
    shard_token_index,
)


def test_labels_are_shifted_over_the_full_sequence_before_sharding() -> None:
    ids = torch.arange(1, 9).unsqueeze(0)  # [1, 8]
    shards = [shard_for_sequence_parallel({"input_ids": ids}, r, 2) for r in range(2)]
    # rank 0's last token predicts token 5, which lives on rank 1
    assert shards[0]["shift_labels"].tolist() == [[2, 3, 4, 5]]
    assert shards[1]["shift_labels"].tolist() == [[6, 7, 8, IGNORE_INDEX]]
    assert shards[1]["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert "labels" not in shards[0], "HF would compute its own (wrong, shard-local) loss from 'labels'"


def test_position_ids_are_created_globally() -> None:
    ids = torch.ones(2, 8, dtype=torch.long)
    shards = [shard_for_sequence_parallel({"input_ids": ids}, r, 4) for r in range(4)]
    assert [s["position_ids"].tolist() for s in shards] == [[[2 * r, 2 * r + 1]] * 2 for r in range(4)]


def test_given_position_ids_are_kept_for_packed_sequences() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    shard = shard_for_sequence_parallel({"input_ids": torch.ones(1, 8, dtype=torch.long), "position_ids": pos}, 1, 2)
    assert shard["position_ids"].tolist() == [[1, 0, 1, 2]]


def test_length_not_divisible_is_padded_not_truncated() -> None:
    ids = torch.arange(1, 8).unsqueeze(0)  # 7 tokens, sp=4 -> padded to 8
    full = prepare_batch({"input_ids": ids}, pad_to_multiple_of=4, pad_token_id=0)
    assert full["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]]
    assert full["shift_labels"].tolist() == [[2, 3, 4, 5, 6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    assert full["position_ids"].tolist() == [list(range(8))]  # pads continue the sequence, no fake new document
    shards = [shard_batch(full, r, 4) for r in range(4)]
    assert torch.cat([s["input_ids"] for s in shards], dim=1).tolist() == full["input_ids"].tolist()


def test_pad_to_multiple_of_larger_than_sp() -> None:
    full = shard_for_sequence_parallel({"input_ids": torch.ones(1, 5, dtype=torch.long)}, 0, 2, pad_to_multiple_of=8)
    assert full["input_ids"].shape == (1, 4)


def test_right_padding_mask_folds_into_labels_and_is_dropped() -> None:
    ids = torch.tensor([[1, 2, 3, 4, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    full = prepare_batch({"input_ids": ids, "attention_mask": mask}, 2)
    assert full["shift_labels"].tolist() == [[2, 3, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert "attention_mask" not in full


def test_explicit_labels_are_respected() -> None:
    ids = torch.tensor([[1, 2, 3, 4]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4]])
    full = prepare_batch({"input_ids": ids, "labels": labels}, 2)
    assert full["shift_labels"].tolist() == [[IGNORE_INDEX, 3, 4, IGNORE_INDEX]]


def test_non_sequence_entries_are_kept_whole() -> None:
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "idx": torch.tensor([3, 7]), "source": ["a", "b"]}
    shard = shard_for_sequence_parallel(batch, 1, 2)
    assert shard["idx"].tolist() == [3, 7] and shard["source"] == ["a", "b"]


def test_extra_sequence_tensors_are_sharded_and_padded() -> None:
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "token_type_ids": torch.tensor([[5, 6, 7]])}
    shards = [shard_for_sequence_parallel(batch, r, 2) for r in range(2)]
    assert [s["token_type_ids"].tolist() for s in shards] == [[[5, 6]], [[7, 0]]]


@pytest.mark.parametrize(
    "batch, error, fix",
    [
        ({"labels": torch.ones(1, 4)}, KeyError, "needs 'input_ids'"),
        ((torch.ones(1, 4),), TypeError, "Return a dict from your dataset"),
        (
            {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.tensor([[0, 0, 1, 1]])},
            ValueError,
            "padding_side='right'",
        ),
        ({"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 3)}, ValueError, "must match"),
        ({"input_ids": torch.ones(4, dtype=torch.long)}, ValueError, "input_ids must be [batch, seq]"),
    ],
    ids=["missing_input_ids", "tuple_batch", "left_padding", "labels_shape", "1d_input_ids"],
)
def test_bad_batches_are_rejected_with_the_fix(batch, error, fix) -> None:
    with pytest.raises(error) as err:
        shard_for_sequence_parallel(batch, 0, 2)
    assert fix in str(err.value)


def test_pad_multiple_must_be_a_multiple_of_sp() -> None:
    with pytest.raises(ValueError, match="must be a multiple of sequence_parallel_size=4"):
        shard_for_sequence_parallel({"input_ids": torch.ones(1, 8, dtype=torch.long)}, 0, 4, pad_to_multiple_of=6)


def test_zigzag_ring_sharding_balances_chunks_and_keeps_every_token_once() -> None:
    # sp 4 = ulysses 2 x ring 2: ring rank 0 owns chunks 0 and 3 of 4, ring rank 1 chunks 1 and 2;
    # its Ulysses ranks take consecutive pieces of that segment.
    index = shard_token_index(16, sp=4, ring=2)
    assert index.tolist() == [[0, 1, 2, 3], [12, 13, 14, 15], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert sorted(index.flatten().tolist()) == list(range(16))
    assert shard_token_index(8, sp=4, ring=1).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert shard_token_index(8, sp=2, ring=2, zigzag=False).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_ring_pads_to_twice_sp_and_shards_positions_and_labels_alike() -> None:
    ids = torch.arange(1, 11).unsqueeze(0)  # 10 tokens, ring 2 needs a multiple of 4 -> 12
    shards = [shard_for_sequence_parallel({"input_ids": ids}, r, 2, ring=2) for r in range(2)]
    assert [s["input_ids"].shape[1] for s in shards] == [6, 6]
    assert shards[0]["position_ids"].tolist() == [[0, 1, 2, 9, 10, 11]]
    assert shards[1]["position_ids"].tolist() == [[3, 4, 5, 6, 7, 8]]
    # label of token t is token t+1 wherever t lives; the last real token (position 9) and pads predict nothing
    assert shards[0]["shift_labels"].tolist() == [[2, 3, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert shards[1]["shift_labels"].tolist() == [[5, 6, 7, 8, 9, 10]]


def test_ring_shards_packed_rows_and_rejects_a_bad_pad_multiple() -> None:
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])  # packed rows shard like any row; ring attention reads the samples
    shard = shard_for_sequence_parallel({"input_ids": torch.ones(1, 8, dtype=torch.long), "position_ids": pos}, 0, 2,
                                        ring=2)
    assert shard["position_ids"].tolist() == [[0, 1, 2, 3]]  # zigzag: chunks 0 and 3 of 4
    with pytest.raises(ValueError, match=r"2 x sequence_parallel_size = 4 \(zigzag ring\)"):
        shard_for_sequence_parallel({"input_ids": torch.ones(1, 8, dtype=torch.long)}, 0, 2, pad_to_multiple_of=6, ring=2)


def test_step_context_is_built_from_the_full_batch_and_this_ranks_shard() -> None:
    """step_context.build: counts, token mask and positions from the full batch, without a Trainer or a process group
    (no private key travels in the batch: the mask is sharded on its own)."""
    from types import SimpleNamespace

    from lightning_ulysses.parallel import step_context
    from lightning_ulysses.parallel.layout import ParallelLayout
    from lightning_ulysses.parallel.sharding import prepare_for_sharding

    ids = torch.arange(1, 13).reshape(2, 6)
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    full = prepare_for_sharding(batch, 2, pad_to_multiple_of=4)  # [2, 8]
    groups = SimpleNamespace(layout=ParallelLayout(2, 2), sp=2, sp_rank=1, ring=1, dp=1, sp_group=None, dp_group=None)
    local = shard_batch(full, 1, 2)
    ctx = step_context.build(batch=batch, full=full, local=local, groups=groups)
    assert set(local) == set(full) and not any(k.startswith("_") for k in local)
    assert ctx.num_valid_tokens == 5 + 3 and ctx.grad_normalizer == 8.0 and ctx.step_loss_weight is None
    assert ctx.token_mask.tolist() == [[True, True, False, False], [False, False, False, False]]
    assert ctx.real_lengths.tolist() == [6, 4] and ctx.input_length == 6
    assert ctx.token_index.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(ctx.global_positions, full["position_ids"]) and ctx.segments is None
    assert ctx.applies_to(local["shift_labels"])
    with pytest.raises(RuntimeError, match="needs the training dataloader"):
        step_context.build(batch=batch, full=full, local=local, groups=groups, loss_normalization="global_tokens")
    ctx = step_context.build(batch=batch, full=full, local=local, groups=groups, loss_normalization="global_tokens",
                             window_tokens=16, accumulate_grad_batches=2)
    assert ctx.grad_normalizer == 8.0 and ctx.step_loss_weight == 0.5  # 16 tokens in the window, 2 micro-batches
