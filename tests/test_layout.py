"""Layout resolution ("auto") and every impossible request rejected with a message naming the fix."""

from __future__ import annotations

import pytest

from lightning_ulysses.layout import ParallelLayout, auto_sequence_parallel_size, heads_allow


@pytest.mark.parametrize(
    "world, heads, kv, expected",
    [
        (4, 32, 8, 4),  # Llama-3-8B style GQA
        (8, 32, 8, 8),
        (16, 32, 8, 16),  # kv heads replicated 2x
        (4, 9, 3, 1),  # SmolLM2-135M: 9 heads do not split over 2 or 4
        (6, 9, 3, 3),
        (4, 4, 1, 4),  # MQA: the single kv head is replicated
        (1, 8, 8, 1),
    ],
)
def test_auto_picks_largest_degree_the_heads_allow(world, heads, kv, expected) -> None:
    assert auto_sequence_parallel_size(world, heads, kv) == expected
    layout = ParallelLayout.resolve("auto", world, heads, kv, "sdpa")
    assert (layout.sp, layout.dp) == (expected, world // expected)


def test_auto_falls_back_when_kv_heads_do_not_split() -> None:
    # 12 q heads split over 2, but 3 kv heads neither divide by 2 nor divide 2
    assert not heads_allow(2, 12, 3)
    assert auto_sequence_parallel_size(2, 12, 3) == 1


def test_layout_groups_are_contiguous_sp_blocks_and_strided_dp() -> None:
    layout = ParallelLayout(world_size=8, sp=4)
    assert layout.sp_group_ranks() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.dp_group_ranks() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [layout.sp_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [layout.dp_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        (dict(sequence_parallel_size=8, world_size=4), "launch at least 8 processes"),
        (dict(sequence_parallel_size=3, world_size=4), "Use one of [1, 2, 4]"),
        (dict(sequence_parallel_size=0, world_size=4), "positive int or 'auto'"),
        (dict(sequence_parallel_size=-2, world_size=4), "positive int or 'auto'"),
        (dict(sequence_parallel_size="four", world_size=4), "positive int or 'auto'"),
        (dict(sequence_parallel_size="auto", world_size=4), "pass an int instead"),
        (dict(sequence_parallel_size=4, world_size=4, num_heads=6, num_kv_heads=6), "Valid degrees for world size 4: [1, 2]"),
        (dict(sequence_parallel_size=2, world_size=2, num_heads=12, num_kv_heads=3), "num_key_value_heads % sp == 0"),
        (
            dict(sequence_parallel_size=2, world_size=2, num_heads=4, num_kv_heads=4, attn_implementation="eager"),
            "attn_implementation set to one of ['sdpa', 'flash_attention_2', 'flash_attention_3']",
        ),
        (
            dict(sequence_parallel_size=2, world_size=2, num_heads=4, num_kv_heads=4, attn_implementation="flex_attention"),
            "attn_implementation set to one of",
        ),
    ],
    ids=[
        "sp_larger_than_world",
        "sp_does_not_divide_world",
        "sp_zero",
        "sp_negative",
        "sp_not_a_number",
        "auto_without_heads",
        "heads_not_divisible",
        "kv_heads_not_compatible",
        "eager_attention",
        "flex_attention_not_yet",
    ],
)
def test_invalid_layout_is_rejected_with_the_fix(kwargs, fix) -> None:
    with pytest.raises(ValueError) as err:
        ParallelLayout.resolve(**kwargs)
    assert fix in str(err.value)


def test_sp_one_accepts_any_attention() -> None:
    assert ParallelLayout.resolve(1, 2, 4, 4, "eager").dp == 2
