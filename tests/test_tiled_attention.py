"""Tiled attention backward: exact against SDPA, in a model, alone and behind Ulysses (parity tests
cover the strategy), and it steps aside for calls it cannot serve exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_ulysses.memory.activation_checkpoint import enable_gradient_checkpointing
from lightning_ulysses.memory.tiled_attention import TiledAttentionCore, disable_tiled_attention, enable_tiled_attention, tiled_attention_of
from lightning_ulysses.kernels.tiled import tiled_attention
from tests.test_ulysses import tiny_llama


def _qkv(hq: int, hkv: int, s: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, s, 16, generator=g, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv))
    return q, k, v, torch.randn(2, hq, s, 16, generator=g, dtype=dtype)


def _grads(fn, q, k, v, dout):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


# MHA / GQA / MQA; tiles that do not divide the length (a 1-token last tile); fewer than MIN_TILES
# tiles (the untiled backward)
@pytest.mark.parametrize("hq,hkv,s,tile", [(4, 4, 37, 8), (4, 2, 64, 16), (6, 1, 50, 7), (4, 2, 33, 16), (4, 2, 16, 64)])
def test_matches_sdpa_in_fp32(hq, hkv, s, tile) -> None:
    q, k, v, dout = _qkv(hq, hkv, s, torch.float32)
    ours = _grads(lambda *t: tiled_attention(*t, tile_tokens=tile), q, k, v, dout)
    ref = _grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4)], ids=["gqa_query_tiles_outer", "mha_key_tiles_outer"])
def test_tiles_sum_to_the_untiled_kernel_exactly_in_fp64(hq, hkv) -> None:
    """Block gradients against the global out/lse are exact: only summation order differs (1e-15)."""
    q, k, v, dout = _qkv(hq, hkv, 50, torch.float64)
    tiled = _grads(lambda *t: tiled_attention(*t, tile_tokens=7), q, k, v, dout)
    whole = _grads(lambda *t: tiled_attention(*t, tile_tokens=10_000), q, k, v, dout)
    for a, b in zip(tiled, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("s,tile,calls", [(16, 4, 10), (17, 4, 15), (16, 5, 1), (16, 64, 1)])
def test_backward_runs_one_kernel_call_per_causal_tile_pair(s, tile, calls, monkeypatch) -> None:
    """n tiles -> n(n+1)/2 block calls; below MIN_TILES tiles the kernel's own single backward."""
    from lightning_ulysses.kernels.attention import _CPUKernel

    seen: list[tuple[int, int]] = []
    real = _CPUKernel.backward
    monkeypatch.setattr(_CPUKernel, "backward", lambda self, do, q, k, *a: (seen.append((q.shape[2], k.shape[2])), real(self, do, q, k, *a))[1])
    q, k, v, dout = _qkv(4, 2, s, torch.float32)
    torch.autograd.grad(tiled_attention(q, k, v, tile_tokens=tile), (q, k, v), dout)
    assert len(seen) == calls and max(max(x) for x in seen) == (tile if calls > 1 else s)


def test_math_backend_matches_sdpa() -> None:
    q, k, v, dout = _qkv(4, 2, 21, torch.float32)
    ours = _grads(lambda *t: tiled_attention(*t, tile_tokens=5, backend="math"), q, k, v, dout)
    ref = _grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True), q, k, v, dout)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_fix() -> None:
    q, k, v, _ = _qkv(4, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        tiled_attention(q, k, v)
    q, k, v, _ = _qkv(4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="as many keys as queries"):
        tiled_attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="tile_tokens must be positive"):
        tiled_attention(q, k, v, tile_tokens=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        TiledAttentionCore(backend="xformers")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        enable_tiled_attention(tiny_llama(attn="eager"))


def _loss_and_grads(model, **batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpoint_policy", [None, "full", "save_attention"])
def test_model_loss_and_grads_unchanged(checkpoint_policy) -> None:
    ref, model = tiny_llama(), tiny_llama()
    if checkpoint_policy:
        enable_gradient_checkpointing(model, checkpoint_policy)
    core = enable_tiled_attention(model, tile_tokens=4)
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))
    loss_ref, g_ref = _loss_and_grads(ref, input_ids=ids, labels=ids)
    loss, g = _loss_and_grads(model, input_ids=ids, labels=ids)
    layers = model.config.num_hidden_layers
    # every layer took the tiled path (a checkpointed layer runs its forward again in backward; under
    # save_attention that re-run gets the kernel's saved outputs instead of computing them)
    assert core.calls == (2 * layers if checkpoint_policy else layers)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_steps_aside_where_it_would_not_be_exact() -> None:
    model = tiny_llama()
    core = enable_tiled_attention(model, tile_tokens=4)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():  # no gradient: nothing to tile
        model(input_ids=ids)
    assert core.calls == 0
    # an attention mask (padding, or a packing/sliding-window mask HF or Ulysses built): the original kernel
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ref = tiny_llama()
    ref(input_ids=ids, attention_mask=mask).logits.sum().backward()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert core.calls == 0
    for p, p_ref in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)


def test_enable_is_idempotent_and_disable_restores() -> None:
    model = tiny_llama()
    enable_tiled_attention(model, tile_tokens=4)
    core = enable_tiled_attention(model, tile_tokens=8)
    assert tiled_attention_of(model) is core and core.tile_tokens == 8
    disable_tiled_attention(model)
    assert tiled_attention_of(model) is None
    ids = torch.randint(0, 64, (1, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert core.calls == 0


def test_kernel_probe_inside_selective_checkpointing_does_not_shift_the_saved_outputs(monkeypatch) -> None:
    """The first call probes the kernel for native GQA. Under save_attention the probe runs inside the
    checkpointed forward; had selective checkpointing recorded the probe's kernel call, the recompute
    (which does not probe again) would have been handed the probe's outputs (seen on GPU)."""
    import lightning_ulysses.kernels.tiled as mod

    monkeypatch.setattr(mod, "_PROBED_KERNELS", ("cudnn", "flash", "cpu"))
    mod._native_gqa.cache_clear()
    try:
        ref, model = tiny_llama(), tiny_llama()
        enable_gradient_checkpointing(model, "save_attention")
        enable_tiled_attention(model, tile_tokens=4)
        ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))
        loss_ref, g_ref = _loss_and_grads(ref, input_ids=ids, labels=ids)
        loss, g = _loss_and_grads(model, input_ids=ids, labels=ids)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
        for n in g_ref:
            torch.testing.assert_close(g[n], g_ref[n], rtol=1e-5, atol=1e-6, msg=n)
    finally:
        mod._native_gqa.cache_clear()


def test_packed_rows_equal_sdpa_with_the_block_diagonal_mask() -> None:
    """One kernel call per segment (two rows, different packings, a 1-token segment, tiled long
    segments) equals SDPA under the dense block-causal mask the Ulysses path used to build."""
    from lightning_ulysses.parallel.ulysses import causal_mask
    from lightning_ulysses.parallel.sharding import packed_segments
    from lightning_ulysses.kernels.tiled import packed_causal_attention, segment_bounds

    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 0, 0, 1],
                        [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
    segments = packed_segments(pos)
    bounds = segment_bounds(segments)
    assert bounds[0] == [(0, 12), (12, 17), (17, 18), (18, 20)] and bounds[1] == [(0, 3), (3, 20)]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 20, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 20, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 20, 8, generator=g, requires_grad=True)
    dout = torch.randn(2, 4, 20, 8, generator=g)
    mask = causal_mask(pos, segments, None)
    ref = _grads(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask, enable_gqa=True), q, k, v, dout)
    for tile in (None, 3):
        ours = _grads(lambda *t: packed_causal_attention(*t, bounds, tile_tokens=tile), q, k, v, dout)
        for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} tile={tile}")


@pytest.mark.parametrize("chunk", [1, 6, 2048])
def test_short_segments_share_one_masked_call_with_the_same_result(chunk: int) -> None:
    """Segments shorter than ``chunk_tokens`` are grouped (one masked kernel call per group); 1: every segment alone,
    6: mixed (the 12-token segment alone, short ones grouped), 2048: every row in one group."""
    from lightning_ulysses.kernels.tiled import _chunks, packed_causal_attention, segment_bounds
    from lightning_ulysses.parallel.sharding import packed_segments
    from lightning_ulysses.parallel.ulysses import causal_mask

    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 0, 0, 1],
                        [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
    bounds = segment_bounds(packed_segments(pos))
    assert _chunks(bounds[0], 6) == [[(0, 12)], [(12, 17), (17, 18)], [(18, 20)]]
    q, k, v = (torch.randn(2, h, 20, 8, requires_grad=True) for h in (4, 2, 2))
    dout = torch.randn(2, 4, 20, 8)
    mask = causal_mask(pos, packed_segments(pos), None)
    ref = _grads(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask, enable_gqa=True), q, k, v, dout)
    ours = _grads(lambda *t: packed_causal_attention(*t, bounds, tile_tokens=3, chunk_tokens=chunk), q, k, v, dout)
    for name, x, y in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"{name} chunk={chunk}")
