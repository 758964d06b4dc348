"""Private dependency APIs wrapped in lightning_ulysses.compat still mean what the wrappers assume."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_ulysses.compat.lightning import lightning_step_boundary


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.boundaries: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.boundaries.append(lightning_step_boundary(self.trainer))
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_step_boundary_is_every_accumulation_window_and_the_epoch_end(tmp_path) -> None:
    module = _Tiny()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(torch.randn(5, 2), batch_size=1))
    # 5 batches per epoch: windows [0,1], [2,3], [4] (short, at the epoch end); windows restart each epoch
    assert module.boundaries == [False, True, False, True, True] * 2
    assert trainer.global_step == 6


# ------------------------------------------------------------------------------------------------ lightning
def test_lightning_private_hooks_we_override_still_exist() -> None:
    import inspect

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    from lightning_ulysses.compat.lightning import OVERRIDDEN_PRIVATE_HOOKS, trainer_of

    for name, params in OVERRIDDEN_PRIVATE_HOOKS.items():
        assert tuple(inspect.signature(getattr(DeepSpeedStrategy, name)).parameters) == params, name
    assert callable(DDPStrategy.setup_environment)
    module = _Tiny()
    assert trainer_of(module) is None
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    module.trainer = trainer
    assert trainer_of(module) is trainer


# ------------------------------------------------------------------------------------------------ deepspeed
def test_deepspeed_zero3_internals_we_use() -> None:
    import inspect

    import deepspeed
    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from deepspeed.utils import groups

    from lightning_ulysses.compat.deepspeed import is_zero3_params, set_zero3_grads_ready, use_mpu, zero_init_paused

    for name in ("shutdown_init_context", "restore_init_context", "top_level_context"):
        assert hasattr(partition_parameters, name), name
    # ZeRO-3 still reads the readiness flag the tiled MLP sets
    assert "ds_grad_is_ready" in inspect.getsource(DeepSpeedZeroOptimizer_Stage3)
    p = torch.nn.Parameter(torch.ones(2))
    assert not is_zero3_params([p])
    set_zero3_grads_ready([p], False)
    assert p.ds_grad_is_ready is False
    with zero_init_paused():  # no zero.Init active: a no-op
        assert torch.nn.Linear(2, 2).weight.numel() == 4
    assert deepspeed.__version__.startswith("0.")
    # reductions read the module-global mpu on every call; use_mpu sets (and resets) it
    assert "mpu" in inspect.getsource(groups._get_data_parallel_group)
    marker = object()
    use_mpu(marker)
    assert groups.mpu is marker
    use_mpu(None)
    assert groups.mpu is None
    # the engine skips its bf16 cast for a model built under zero.Init; parameters added later are cast here
    from deepspeed.runtime.engine import DeepSpeedEngine

    from lightning_ulysses.compat.deepspeed import cast_late_parameters

    assert "is_zero_init_model" in inspect.getsource(DeepSpeedEngine._cast_module_mixed_precision)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2).bfloat16(), torch.nn.Linear(2, 2))  # [0]: "partitioned"
    for q in model[0].parameters():
        q.ds_id = 0
    assert cast_late_parameters(model, {"bf16": {"enabled": False}}) == 0
    assert cast_late_parameters(model, {"bf16": {"enabled": True}}) == 2
    assert {q.dtype for q in model.parameters()} == {torch.bfloat16}
    plain = torch.nn.Linear(2, 2)  # not built under zero.Init: the engine casts it itself
    assert cast_late_parameters(plain, {"bf16": {"enabled": True}}) == 0 and plain.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ transformers
def _tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def test_transformers_attention_registry_and_layer_internals() -> None:
    from lightning_ulysses.compat.transformers import (
        attention_functions,
        attn_implementation,
        checkpointed_layers,
        fixed_cross_entropy,
        kv_groups,
        set_checkpoint_function,
    )

    functions = attention_functions()
    original = functions.get("sdpa")
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model = _tiny_llama()
    assert attn_implementation(model) == attn_implementation(model.config) == "sdpa"
    functions.set("sdpa", wrapped)
    try:
        model(input_ids=torch.randint(0, 64, (1, 5)))
    finally:
        functions.set("sdpa", original)
    assert len(calls) == 2, "every layer's attention goes through the registry entry"
    attn = model.model.layers[0].self_attn
    with kv_groups(attn, 1):
        assert attn.num_key_value_groups == 1
    assert attn.num_key_value_groups == 2
    layers = checkpointed_layers(model)
    assert layers == list(model.model.layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    used = []
    from torch.utils.checkpoint import checkpoint

    set_checkpoint_function(layers[1], lambda *a, **k: used.append(1) or checkpoint(*a, use_reentrant=False, **k))
    model(input_ids=torch.randint(0, 64, (1, 5)), labels=torch.randint(0, 64, (1, 5))).loss.backward()
    assert used == [1], "HF layers call the checkpoint function we set"
    ce = fixed_cross_entropy()(torch.randn(3, 4), torch.tensor([0, 1, -100]), num_items_in_batch=1, ignore_index=-100)
    assert ce.ndim == 0


def test_transformers_zero3_switch() -> None:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from lightning_ulysses.compat.transformers import TransformersZero3

    z = TransformersZero3()
    z.enable({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert z.enabled and is_deepspeed_zero3_enabled()
    finally:
        z.disable()
    assert not z.enabled and not is_deepspeed_zero3_enabled()


# ------------------------------------------------------------------------------------------------ torch
def test_torch_private_ops_and_collectives(tmp_path) -> None:
    import torch.distributed as dist

    from lightning_ulysses.compat.torch import SDPA_OPS, all_to_all_autograd, no_dispatch_modes

    for name in SDPA_OPS:
        assert hasattr(torch.ops.aten, name), name
    with no_dispatch_modes():
        assert torch.ones(1).item() == 1.0
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.arange(4.0, requires_grad=True)
        y = all_to_all_autograd(x.view(1, 4), dist.group.WORLD)
        y.sum().backward()
        assert torch.equal(y.view(-1), x.detach()) and torch.equal(x.grad, torch.ones(4))
    finally:
        dist.destroy_process_group()
