"""Gradient checkpointing policies: "save_attention" keeps attention-kernel outputs and never recomputes attention."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_ulysses.lightning.callbacks import GradientCheckpointing
from lightning_ulysses.memory.activation_checkpoint import attention_kernel_ops, checkpoint_policy_of, enable_gradient_checkpointing, saved_attention_fraction
from lightning_ulysses.models.flops import ModelDims, recompute_flops


class _CountAttention(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in attention_kernel_ops():
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.train()
    return model


@pytest.mark.parametrize("policy, recomputed", [(None, 0), ("full", 3), ("save_attention", 0)])
def test_policy_decides_whether_backward_recomputes_attention(policy, recomputed) -> None:
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _model()
    ref(input_ids=ids, labels=ids).loss.backward()
    model = _model()
    if policy is not None:
        enable_gradient_checkpointing(model, policy)
    assert checkpoint_policy_of(model) == policy
    loss = model(input_ids=ids, labels=ids).loss
    counter = _CountAttention()
    with counter:
        loss.backward()
    assert counter.calls == recomputed  # one attention kernel per layer when the whole layer is recomputed
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=1e-6, msg=name)


def test_save_attention_recomputes_only_the_dense_part() -> None:
    dims = ModelDims(n_matmul_params=1000, layers=2, hidden=8)
    assert recompute_flops(dims, 10, 100, attention=False) == 2 * 1000 * 10
    assert recompute_flops(dims, 10, 100) == 2 * 1000 * 10 + 2 * 2 * 8 * 100


def test_the_modules_switch_goes_through_the_plan() -> None:
    """CausalLMModule(gradient_checkpointing=False) takes checkpointing out of the plan; with offload in it (which
    builds on checkpointing) that is an error naming both."""
    from lightning_ulysses import CausalLMModule
    from lightning_ulysses.lightning.callbacks import ActivationOffload
    from lightning_ulysses.memory import trainer_tricks

    module = CausalLMModule(model=_model(), gradient_checkpointing=False)
    _attach(module, [GradientCheckpointing()])
    assert trainer_tricks(module.trainer) == []
    _attach(module, [ActivationOffload()])
    with pytest.raises(ValueError, match="turns GradientCheckpointing off, but ActivationOffload builds on it"):
        trainer_tricks(module.trainer)
    module = CausalLMModule(model=_model(), gradient_checkpointing=True)
    _attach(module, [])
    assert trainer_tricks(module.trainer) == [GradientCheckpointing()]


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"one of \['full', 'save_attention'\]"):
        GradientCheckpointing("save_everything")


def test_module_and_offload_keep_a_chosen_policy() -> None:
    """CausalLMModule(gradient_checkpointing=True) and ActivationOffload run after the policy was chosen."""
    from lightning_ulysses import CausalLMModule
    from lightning_ulysses.lightning.callbacks import ActivationOffload

    module = CausalLMModule(model=_model(), gradient_checkpointing=True)
    _attach(module, [GradientCheckpointing("save_attention"), ActivationOffload()])
    module.on_fit_start()  # the module's request joins the plan; the callbacks' checkpointing (with its policy) wins
    assert checkpoint_policy_of(module.model) == "save_attention"
    module.teardown("fit")  # what the plan applied comes off again
    assert checkpoint_policy_of(module.model) is None


def _attach(module, callbacks) -> None:
    """A Trainer as far as the memory plan reads one: its trick callbacks, a strategy without tricks, the module."""
    from types import SimpleNamespace

    module._trainer = SimpleNamespace(callbacks=callbacks, strategy=SimpleNamespace(), lightning_module=module)


@pytest.mark.parametrize("keep", [0, 1, 2, 3])
def test_save_attention_in_some_layers_recomputes_the_others(keep) -> None:
    """save_attention_layers=N: the first N layers keep attention outputs, the others recompute attention;
    gradients are those of no checkpointing either way."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _model()
    ref(input_ids=ids, labels=ids).loss.backward()
    model = _model()
    enable_gradient_checkpointing(model, "save_attention", save_attention_layers=keep)
    assert checkpoint_policy_of(model) == "save_attention" and saved_attention_fraction(model) == keep / 3
    loss = model(input_ids=ids, labels=ids).loss
    counter = _CountAttention()
    with counter:
        loss.backward()
    assert counter.calls == 3 - keep
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=1e-6, msg=name)


def test_the_layer_count_survives_offload_and_the_module() -> None:
    from lightning_ulysses import CausalLMModule
    from lightning_ulysses.lightning.callbacks import ActivationOffload

    module = CausalLMModule(model=_model(), gradient_checkpointing=True)
    _attach(module, [GradientCheckpointing("save_attention", save_attention_layers=1), ActivationOffload()])
    module.on_fit_start()
    assert saved_attention_fraction(module.model) == 1 / 3
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    loss = module.model(input_ids=ids, labels=ids).loss
    counter = _CountAttention()
    with counter:
        loss.backward()
    assert counter.calls == 2


def test_save_attention_layers_needs_the_policy_and_a_count() -> None:
    from lightning_ulysses import UlyssesDeepSpeedStrategy

    with pytest.raises(ValueError, match="needs policy='save_attention'"):
        GradientCheckpointing("full", save_attention_layers=2)
    with pytest.raises(ValueError, match="set that policy or drop the option"):
        UlyssesDeepSpeedStrategy(save_attention_layers=2)
    with pytest.raises(ValueError, match="layer count >= 0"):
        UlyssesDeepSpeedStrategy(checkpoint_policy="save_attention", save_attention_layers=-1)
    with pytest.raises(ValueError, match="layer count >= 0"):
        enable_gradient_checkpointing(_model(), "save_attention", save_attention_layers=1.5)
    assert recompute_flops(ModelDims(1000, 2, 8), 10, 100, attention=0.5) == 2 * 1000 * 10 + 2 * 8 * 100


def test_choosing_full_later_drops_the_layer_count() -> None:
    model = _model()
    enable_gradient_checkpointing(model, "save_attention", save_attention_layers=1)
    enable_gradient_checkpointing(model, "full")
    assert saved_attention_fraction(model) == 0.0
    enable_gradient_checkpointing(model, "save_attention")
    assert saved_attention_fraction(model) == 1.0


def test_save_attention_with_the_tiled_mlp_is_exact_and_never_recomputes_attention() -> None:
    """The ``save_attention+offload+tiled_mlp`` plan of ``memory="auto"`` without the offload (a CPU has no pinned
    memory to offload to): the MLP in token tiles inside a selectively checkpointed layer."""
    from lightning_ulysses.memory import GradientCheckpointing as Checkpointing
    from lightning_ulysses.memory import TiledMLP, apply_tricks

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _model()
    ref(input_ids=ids, labels=ids).loss.backward()
    model = _model()
    apply_tricks(model, [Checkpointing("save_attention"), TiledMLP(tile_tokens=5)])
    loss = model(input_ids=ids, labels=ids).loss
    counter = _CountAttention()
    with counter:
        loss.backward()
    assert counter.calls == 0
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=1e-6, msg=name)


def test_a_frozen_embedding_output_stays_out_of_the_graph_and_adapters_get_exact_gradients() -> None:
    """transformers hooks the input embeddings so their output requires grad (reentrant checkpointing needs it); with
    the embedding frozen (LoRA) that output became a leaf autograd holds for the whole step, and backward computed a
    [tokens, hidden] gradient for it. Checkpointing here is non-reentrant: the hook is dropped, and the adapters'
    gradients equal those without checkpointing; a hook the user added stays."""
    peft = pytest.importorskip("peft")
    from lightning_ulysses.compat.transformers import has_input_grads_hook
    from lightning_ulysses.memory.activation_checkpoint import disable_gradient_checkpointing

    ids = torch.randint(0, 64, (1, 24))
    grads = []
    for checkpointing in (False, True):
        model = peft.get_peft_model(_model(), peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        base = model.get_base_model()
        if checkpointing:
            enable_gradient_checkpointing(base, "full")
            assert not has_input_grads_hook(base)
        seen = []
        handle = base.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
        model(input_ids=ids, labels=ids).loss.backward()
        handle.remove()
        assert seen == [False]
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 3 * 7 * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    # the user's own hook (added before) is kept through enable and disable
    user = _model()
    user.enable_input_require_grads()
    enable_gradient_checkpointing(user, "full")
    assert has_input_grads_hook(user)
    disable_gradient_checkpointing(user)
    assert has_input_grads_hook(user)
