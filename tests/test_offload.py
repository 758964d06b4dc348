"""Activation-checkpoint CPU offload changes nothing numerically, really offloads, and leaks nothing."""

from __future__ import annotations

import weakref

import torch

from lightning_ulysses.memory.offload import (
    HostBufferPool,
    PinnedBuffer,
    activation_offloader,
    disable_activation_offload,
    enable_activation_offload,
)
from tests.test_ulysses import tiny_llama


def checkpointed():
    model = tiny_llama()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def layer_input_refs(model) -> list:
    refs: list = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda mod, args: refs.append(weakref.ref(args[0])))
    return refs


def test_offload_gives_identical_loss_and_gradients() -> None:
    ids = torch.randint(0, 64, (2, 24))
    ref, model = checkpointed(), checkpointed()
    enable_activation_offload(model)
    for m in (ref, model):
        m(input_ids=ids, labels=ids).loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, p_ref.grad), name


def test_checkpointed_layer_inputs_live_on_host_between_forward_and_backward() -> None:
    ids = torch.randint(0, 64, (2, 24))
    plain, model = checkpointed(), checkpointed()
    off = enable_activation_offload(model)
    refs_plain, refs = layer_input_refs(plain), layer_input_refs(model)
    out_plain, out = plain(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    # without offload checkpoint keeps every layer input alive; with it, only host copies remain
    assert all(r() is not None for r in refs_plain)
    assert all(r() is None for r in refs)
    assert off.stats.offloaded >= len(model.model.layers)
    assert {dev for _, dev in off.stats.stored} == {"cpu"}
    assert {shape for shape, _ in off.stats.stored} == {(2, 24, 32)}
    assert off.live_records == off.stats.offloaded
    out.loss.backward()
    out_plain.loss.backward()
    assert off.stats.restored == off.stats.offloaded and off.live_records == 0


def test_nothing_leaks_across_steps() -> None:
    model = checkpointed()
    off = enable_activation_offload(model)
    for _ in range(3):
        model(input_ids=torch.randint(0, 64, (1, 16)), labels=torch.randint(0, 64, (1, 16))).loss.backward()
        assert off.live_records == 0
        assert len(off._records) == off.stats.offloaded  # only this step's records, all released


def test_no_offload_without_checkpointing_or_in_eval() -> None:
    model = tiny_llama()
    model.train()
    off = enable_activation_offload(model)
    model(input_ids=torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8))).loss.backward()
    assert off.stats.offloaded == 0
    model = checkpointed()
    off = enable_activation_offload(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (1, 8)))
    assert off.stats.offloaded == 0


def test_disable_removes_the_hooks() -> None:
    model = checkpointed()
    enable_activation_offload(model)
    disable_activation_offload(model)
    assert activation_offloader(model) is None
    model(input_ids=torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8))).loss.backward()


def test_prefetch_waits_for_each_layers_attention_backward() -> None:
    """The previous layer's input is requested once per layer, after its attention backward, for the
    input restored last (the layer being differentiated); nothing is requested in forward."""
    model = checkpointed()
    off = enable_activation_offload(model)
    assert off.prefetch_after_attention
    requested: list[int] = []
    real = off._prefetch_before
    off._prefetch_before = lambda rec: (requested.append(rec.index), real(rec))
    ids = torch.randint(0, 64, (2, 24))
    out = model(input_ids=ids, labels=ids)
    assert off.stats.prefetch_points == 0 and requested == []
    out.loss.backward()
    layers = len(model.model.layers)
    assert off.stats.prefetch_points == layers
    assert requested == sorted(requested, reverse=True) and len(requested) == layers  # layer by layer, in reverse


def test_the_first_layer_inputs_can_stay_on_the_device() -> None:
    # host RAM can end the sequence first: keep_first layer inputs skip the host, the rest are offloaded
    ids = torch.randint(0, 64, (2, 24))
    ref, model = checkpointed(), checkpointed()
    off = enable_activation_offload(model, keep_layers=1)
    refs = layer_input_refs(model)
    for step in range(2):  # the count restarts every forward
        out = model(input_ids=ids, labels=ids)
        assert off.stats.kept == 1 and [r() is not None for r in refs[-len(model.model.layers):]] == [True, False]
        assert off.live_records == off.stats.offloaded
        out.loss.backward()
        assert off.stats.restored == off.stats.offloaded and off.live_records == 0
    ref(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, p_ref.grad), name
    import pytest

    with pytest.raises(ValueError, match="keep_layers"):
        enable_activation_offload(model, keep_layers=-1)


def test_host_buffers_serve_any_shape_and_the_pool_stays_bounded() -> None:
    # Variable-length data: a pool keyed by shape would keep one set of buffers per length ever seen.
    made = []

    def allocate(n: int) -> PinnedBuffer:
        made.append(n)
        return PinnedBuffer(n, pin=False)  # CPU: the same bookkeeping without cudaHostRegister

    pool = HostBufferPool(allocate)
    for length in (100, 300, 200, 300, 50):  # one "step" of 4 offloaded inputs per length
        bufs = [pool.take(length) for _ in range(4)]
        for b in bufs:
            pool.give(b)
    assert made == [100] * 4 + [300] * 4  # shorter steps reuse the longer buffers; no new ones
    assert pool.free_bytes == [300] * 4  # the 100-byte buffers were let go when they no longer fit

    buf = PinnedBuffer(64, pin=False)
    x = torch.arange(8, dtype=torch.float32).view(2, 4)
    buf.view((2, 4), torch.float32).copy_(x)
    assert torch.equal(buf.view((2, 4), torch.float32), x) and buf.view((3,), torch.bfloat16).shape == (3,)
