"""Layout resolution ("auto") and every impossible request rejected with a message naming the fix."""

from __future__ import annotations

import pytest

from lightning_ulysses.parallel.layout import ParallelLayout, auto_sequence_parallel_size, decompose_context_parallel, heads_allow


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
        (
            dict(sequence_parallel_size=4, world_size=4, num_heads=6, num_kv_heads=6, mode="ulysses_only"),
            "Ulysses degrees that divide 4 and the heads allow: [1, 2]; use context_parallel_mode='auto'",
        ),
        (
            dict(sequence_parallel_size=2, world_size=2, num_heads=12, num_kv_heads=3, mode="ulysses_only"),
            "num_key_value_heads % sp == 0",
        ),
        (dict(sequence_parallel_size=4, world_size=4, num_heads=6, num_kv_heads=6, mode="sideways"), "must be one of"),
        (
            dict(sequence_parallel_size=4, world_size=4, num_heads=4, num_kv_heads=4, ulysses_size=2, ring_size=4),
            "set sequence_parallel_size=8",
        ),
        (dict(sequence_parallel_size=4, world_size=4, num_heads=4, num_kv_heads=4, ring_size=3), "use one of [1, 2, 4]"),
        (
            dict(sequence_parallel_size=4, world_size=4, num_heads=9, num_kv_heads=3, ulysses_size=2),
            "Ulysses degrees that divide 4 and the heads allow: [1]",
        ),
        (
            dict(sequence_parallel_size=4, world_size=4, num_heads=9, num_kv_heads=3, mode="hybrid"),
            "context_parallel_mode='hybrid' needs a Ulysses degree strictly between 1 and 4",
        ),
        (dict(sequence_parallel_size=2, world_size=2, num_heads=4, ulysses_size=0), "positive int or None"),
        (
            dict(sequence_parallel_size=2, world_size=2, num_heads=4, num_kv_heads=4,
                 attn_implementation="kernels-community/vllm-flash-attn3"),
            "attn_implementation set to one of ['sdpa', 'flash_attention_2', 'flash_attention_3', 'eager']",
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
        "heads_not_divisible_ulysses_only",
        "kv_heads_not_compatible_ulysses_only",
        "unknown_mode",
        "manual_sizes_do_not_multiply",
        "ring_size_does_not_divide",
        "manual_ulysses_cannot_split_heads",
        "hybrid_impossible",
        "ulysses_size_zero",
        "hub_kernel_attention",
        "flex_attention_not_yet",
    ],
)
def test_invalid_layout_is_rejected_with_the_fix(kwargs, fix) -> None:
    with pytest.raises(ValueError) as err:
        ParallelLayout.resolve(**kwargs)
    assert fix in str(err.value)


def test_sp_one_accepts_any_attention() -> None:
    assert ParallelLayout.resolve(1, 2, 4, 4, "eager").dp == 2


@pytest.mark.parametrize(
    "sp, heads, kv, kwargs, expected",
    [
        (6, 9, 3, {}, (3, 2)),  # SmolLM2-135M-like: 9 heads on 6 GPUs -> ulysses 3 x ring 2
        (4, 9, 3, {}, (1, 4)),  # 9 heads on 4 -> ring only
        (4, 32, 8, {}, (4, 1)),  # Ulysses alone when the heads allow it
        (8, 32, 8, dict(mode="hybrid"), (4, 2)),
        (4, 32, 8, dict(mode="hybrid"), (2, 2)),
        (4, 32, 8, dict(mode="ring_only"), (1, 4)),
        (8, 32, 8, dict(ulysses_size=4, ring_size=2), (4, 2)),  # manual sp4 x rp2
        (8, 32, 8, dict(ring_size=2), (4, 2)),
        (16, 32, 8, dict(gpus_per_node=8), (8, 2)),  # the all-to-all stays inside an 8-GPU node
        (16, 32, 8, {}, (16, 1)),
    ],
)
def test_context_parallel_decomposition(sp, heads, kv, kwargs, expected) -> None:
    assert decompose_context_parallel(sp, heads, kv, **kwargs) == expected
    layout = ParallelLayout.resolve(sp, sp, heads, kv, "sdpa", **kwargs)
    assert (layout.ulysses, layout.ring) == expected


def test_hybrid_groups_nest_ulysses_blocks_in_rings_and_log_the_layout() -> None:
    layout = ParallelLayout.resolve(4, 8, 8, 8, "sdpa", ulysses_size=2)  # sp 4 = 2 x 2, dp 2
    assert layout.ulysses_group_ranks() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.ring_group_ranks() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert [layout.ring_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [layout.ulysses_rank(r) for r in range(8)] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert "ulysses 2 x ring 2" in layout.describe()


def test_layout_for_a_model_reads_its_heads_and_refuses_what_cannot_be_sharded() -> None:
    """ParallelLayout.for_model: the strategy's layout decision, usable without a Trainer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    assert ParallelLayout.for_model(model, "auto", 8) == ParallelLayout(8, 4, 1)  # 4 heads: Ulysses 4, dp 2
    assert ParallelLayout.for_model(model, 8, 8, mode="auto") == ParallelLayout(8, 8, 2)  # the rest on the ring
    assert ParallelLayout.for_model(None, "auto", 1) == ParallelLayout(1, 1)
    with pytest.raises(ValueError, match="could not find a transformers PreTrainedModel"):
        ParallelLayout.for_model(None, 2, 2)
