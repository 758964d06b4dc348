"""Ulysses attention plumbing: masks, scoping to one model, idempotency (parity tests cover the math)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_ulysses.parallel.ulysses import UlyssesAttention, apply_ulysses, causal_mask, packed_segments, remove_ulysses, ulysses_of
from lightning_ulysses.parallel.layout import ParallelLayout, ProcessGroups


def tiny_llama(attn="sdpa", heads=4, kv=2):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=8,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)


def fake_groups(sp: int = 2) -> ProcessGroups:
    # a stand-in group object: enough for tagging, never used for a collective here
    g = object()
    return ProcessGroups(layout=ParallelLayout(sp, sp), rank=0, sp_group=g, dp_group=None, world_group=None, ulysses_group=g)


def test_packed_segments_match_transformers() -> None:
    from transformers.masking_utils import find_packed_sequence_indices

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [5, 6, 7, 8, 9, 10, 11, 12]])
    ours = packed_segments(pos)
    ref = find_packed_sequence_indices(pos)
    assert torch.equal(ours, ref)
    assert packed_segments(torch.arange(6).unsqueeze(0)) is None


def test_causal_mask_is_block_diagonal_for_packed_rows_and_windowed() -> None:
    pos = torch.tensor([[0, 1, 0, 1]])
    m = causal_mask(pos, packed_segments(pos), None)[0, 0]
    assert m.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ]
    w = causal_mask(torch.arange(4).unsqueeze(0), None, 2)[0, 0]
    assert w[3].tolist() == [False, False, True, True]


def test_apply_is_scoped_to_one_model_and_idempotent() -> None:
    sp_model, other = tiny_llama(), tiny_llama()
    ids = torch.randint(0, 64, (1, 6))
    before = other(ids).logits
    ctx = apply_ulysses(sp_model, fake_groups())
    apply_ulysses(sp_model, fake_groups())  # second fit/validate in the same process
    assert ulysses_of(sp_model) is not ctx and len(sp_model._lightning_ulysses_hooks) == 2
    assert all(ulysses_of(m) is ulysses_of(sp_model) for m in sp_model.modules() if getattr(m, "config", None))
    # the untouched model goes through the original kernel, bit for bit
    assert torch.equal(other(ids).logits, before)
    remove_ulysses(sp_model)
    assert ulysses_of(sp_model) is None and not hasattr(sp_model, "_lightning_ulysses_hooks")
    torch.testing.assert_close(sp_model(ids).logits, before)


def test_eager_at_one_rank_keeps_samples_apart_and_leaves_other_eager_models_untouched() -> None:
    """Eager has no registry entry in transformers: the dispatcher registered under "eager" calls each layer's own
    eager function. A model under the handler (one rank: no all-to-all) gives packed rows the samples' own mask
    (every sample as if alone), also in a call with a KV cache, where transformers itself would let the samples see
    each other; another eager model is untouched, bit for bit."""
    ones = ProcessGroups(layout=ParallelLayout(1, 1), rank=0, sp_group=None, dp_group=None, world_group=None)
    sp_model, other = tiny_llama(attn="eager"), tiny_llama(attn="eager")
    ids = torch.randint(0, 64, (2, 9))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]] * 2)  # packed: three samples per row
    with torch.no_grad():
        alone = torch.cat([other(ids[:, a:b], position_ids=pos[:, a:b]).logits for a, b in ((0, 4), (4, 7), (7, 9))], 1)
        before = other(ids, position_ids=pos).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # sp=1: no memory warning
            apply_ulysses(sp_model, ones)
        torch.testing.assert_close(sp_model(ids, position_ids=pos).logits, alone, rtol=0, atol=1e-5)
        assert torch.equal(other(ids, position_ids=pos).logits, before)
    remove_ulysses(sp_model)


def test_eager_under_sequence_parallelism_warns_about_its_memory() -> None:
    with pytest.warns(UserWarning, match="materialises \\[S, S\\] attention scores"):
        apply_ulysses(tiny_llama(attn="eager"), fake_groups())


def test_apply_rejects_an_attention_kind_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="build the model with one of"):
        apply_ulysses(tiny_llama(attn="flex_attention"), fake_groups())


def test_missing_position_ids_in_the_model_call_is_an_error_that_names_the_fix() -> None:
    ctx = UlyssesAttention(fake_groups())
    q = torch.randn(1, 4, 3, 8)
    kv = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="Pass position_ids=batch\\['position_ids'\\]"):
        ctx(lambda *a, **k: None, torch.nn.Module(), q, kv, kv, None)


def test_heads_that_do_not_split_are_an_error_at_call_time() -> None:
    ctx = UlyssesAttention(fake_groups(sp=4))
    q = torch.randn(1, 6, 3, 8)
    with pytest.raises(ValueError, match="cannot split this layer's heads"):
        ctx(lambda *a, **k: None, torch.nn.Module(), q, q, q, None, position_ids=torch.arange(3)[None])


@pytest.mark.parametrize(
    "kwargs, what",
    [
        (dict(sliding_window=4), "sliding_window=4"),
        (dict(dropout=0.1), "attention dropout=0.1"),
        (dict(softcap=30.0), "logit softcapping"),
    ],
)
def test_ring_refuses_what_causal_ring_kernels_cannot_do(kwargs, what) -> None:
    g = object()
    groups = ProcessGroups(layout=ParallelLayout(4, 4, ring=2), rank=0, sp_group=g, dp_group=None, world_group=None,
                           ulysses_group=g, ring_group=g)
    ctx = UlyssesAttention(groups)
    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="context_parallel_mode='ulysses_only'") as err:
        ctx._ring(torch.nn.Module(), q, q, q, kwargs)
    assert what in str(err.value)


def test_packed_rows_at_sp1_run_per_segment_without_a_dense_mask() -> None:
    """At sp=1 the handler gives packed rows one kernel call per segment; transformers builds no mask at all, and
    the result equals running every sample on its own."""
    from lightning_ulysses.compat.transformers import mask_functions

    model = tiny_llama()
    lengths = [5, 3, 6]
    samples = [torch.randint(0, 64, (1, n)) for n in lengths]
    ids = torch.cat(samples, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    alone = [model(input_ids=s).logits for s in samples]
    apply_ulysses(model, ProcessGroups.build(ParallelLayout(1, 1)))
    masks = mask_functions()
    entry = masks.get("sdpa")
    built = []
    masks.set("sdpa", lambda *a, **k: built.append(entry(*a, **k)) or built[-1])
    try:
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    finally:
        masks.set("sdpa", entry)
        remove_ulysses(model)
    assert built and all(m is None for m in built), "transformers built a mask for a packed row"
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)
    # without the handler, transformers' own (dense block-diagonal mask) path gives the same numbers
    dense = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(dense, packed, rtol=1e-5, atol=1e-5)


def test_flash_packed_rows_of_a_micro_batch_go_to_the_varlen_kernel_together() -> None:
    """transformers' flash path separates packed samples only for a one-row batch; the handler gives its varlen
    kernel every row's samples (transformers' own flash code, torch kernels under it: tests/fake_flash.py)."""
    from tests import fake_flash

    undo = fake_flash.install()
    try:
        model = tiny_llama(attn="flash_attention_2")
        _flash_packed_rows(model)
    finally:
        undo()


def _flash_packed_rows(model) -> None:
    from tests import fake_flash

    rows = [[5, 3, 8], [9, 7]]  # sample lengths of two 16-token rows
    samples = [[torch.randint(0, 64, (1, n)) for n in row] for row in rows]
    ids = torch.cat([torch.cat(row, dim=1) for row in samples])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    alone = torch.cat([torch.cat([model(input_ids=s, use_cache=False).logits for s in row], dim=1) for row in samples])
    dense = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # transformers alone: across samples
    assert (dense - alone).abs().max() > 1e-2
    ctx = apply_ulysses(model, ProcessGroups.build(ParallelLayout(1, 1)))
    before = dict(fake_flash.CALLS)
    try:
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        cu = ctx._varlen_cache[1]
    finally:
        remove_ulysses(model)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert cu.tolist() == [0, 5, 8, 16, 25, 32]  # both rows' samples over the flattened [2 x 16] tokens
    # one varlen call per layer over all 5 samples, the dense kernel never
    assert fake_flash.CALLS["varlen"] - before["varlen"] == 2 and fake_flash.CALLS["dense"] == before["dense"]
    assert fake_flash.CALLS["varlen_segments"] - before["varlen_segments"] == 10
