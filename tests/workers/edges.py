"""What a user meets on day one, several cases in one launched job (process start-up dominates on 2 cores).

``edges.py CASES_JSON OUT_DIR``: each case runs in turn in the same processes; every rank writes
``OUT_DIR/<name>.<rank>.json`` (what it saw: an error's type and message, or the case's facts). Cases:

* ``instance_zero3``: ``CausalLMModule(LlamaForCausalLM(cfg))`` at ZeRO-3, sp=2, tiled MLP, ModelCheckpoint: the
  parameter names, transformers' ZeRO-3 integration during training (off), rank 0 building a plain model alone in a
  callback, the tiled MLP's own collectives (none), the checkpoint path for ``export``.
* ``handed_back``: ZeRO-2, sp=2, the whole memory stack: the user's model after ``fit`` (classes, instance
  attributes, hooks) and its logits against a plain model holding the same weights, then ``generate``.
* ``mamba_auto``: a Mamba model (no attention) with the default attention argument and ``sequence_parallel_size=
  "auto"``: trains at sp 1 x dp 2; ``mamba_packed``: packed rows are refused.
* ``unbatched``: a loader with ``batch_size=None`` yielding 1-D tensors; ``vocab``: ids beyond the embedding;
  ``empty_file``: an SFT data module on an empty file -- each refused, reported by rank 0 alone.
* ``memory_auto``: ``memory="auto"`` and the plan it chose set by hand train with the same losses.
* ``lora_bf16``: LoRA under bf16-mixed at ZeRO-3 and ZeRO-2: adapters compute in bf16 at both stages.
* ``released`` (last: it also checks the cases before it): ZeRO-3, sp=2, AdamW; after ``fit`` the model runs forward
  and ``trainer.save_checkpoint`` writes the optimizer state; once the user drops the trainer, module and model, no
  DeepSpeed engine or ZeRO optimizer of any fit of this process is left alive.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy  # noqa: E402
from lightning_ulysses.data import SFTDataModule, SyntheticLMDataModule  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
ROOT = Path(__file__).resolve().parents[2]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA))


def _trainer(strategy, steps: int = 2, **kwargs) -> L.Trainer:
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=steps, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, **{"enable_checkpointing": False, **kwargs})


def _sgd(p):
    return torch.optim.SGD(p, lr=0.1)


class Probe(L.Callback):
    """During training: transformers' ZeRO-3 flag; at the end, rank 0 alone builds a plain model (a collective would
    hang or fail here if transformers still wrapped it in zero.Init)."""

    def __init__(self) -> None:
        self.facts: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        self.facts["zero3_integration_in_training"] = is_deepspeed_zero3_enabled()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            from transformers import AutoModelForCausalLM, LlamaConfig

            model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
            self.facts["built_alone"] = not any(hasattr(p, "ds_id") for p in model.parameters())


class _CountingDist:
    """``torch.distributed`` as the tiled MLP sees it, counting its all-reduces (the per-layer tile-count sync)."""

    def __init__(self) -> None:
        self.all_reduces = 0

    def __getattr__(self, name: str):
        return getattr(torch.distributed, name)

    def all_reduce(self, *args, **kwargs):
        self.all_reduces += 1
        return torch.distributed.all_reduce(*args, **kwargs)


def instance_zero3(out: Path) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_ulysses.memory.tiled_mlp as tiled_mlp

    module = CausalLMModule(_llama(), optimizer=_sgd)
    names = [n for n, _ in module.named_parameters()]
    probe = Probe()
    ckpt = ModelCheckpoint(dirpath=out / "instance_ckpts", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    # the tiled MLP on ZeRO-3 parameters: its tile count comes from the step context, no collective per layer
    counting = tiled_mlp.dist = _CountingDist()
    calls = {"tiles": 0}
    num_tiles = tiled_mlp.num_tiles
    tiled_mlp.num_tiles = lambda *a, **k: calls.__setitem__("tiles", calls["tiles"] + 1) or num_tiles(*a, **k)
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=2, stage=3, tiled_mlp=True, tiled_mlp_tile_tokens=3)
    trainer = _trainer(strategy, callbacks=[probe, ckpt], enable_checkpointing=True)
    try:
        trainer.fit(module, SyntheticLMDataModule(vocab_size=64, seq_len=16, num_train_samples=4, batch_size=1))
    finally:
        tiled_mlp.dist, tiled_mlp.num_tiles = torch.distributed, num_tiles
    return {"names": names, "checkpoint": str(out / "instance_ckpts" / "step=2.ckpt"), **probe.facts,
            "hparams_model_type": module.hparams["model"].get("model_type"),
            "tiled_mlp_calls": calls["tiles"], "tiled_mlp_all_reduces": counting.all_reduces}


def _shape(model: torch.nn.Module) -> dict:
    """What the user can observe of a model: module classes, instance-level attributes (a patched ``forward``,
    settings), hooks."""
    return {
        "classes": [type(m).__name__ for m in model.modules()],
        "instance_attrs": sorted({k for m in model.modules() for k in vars(m)
                                  if k == "forward" or "ulysses" in k.lower() or k.startswith("_lightning")}),
        "hooks": sorted(f"{type(m).__name__}:{getattr(h, '__qualname__', h)}" for m in model.modules()
                        for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]),
    }


def handed_back(out: Path) -> dict:
    model = _llama()
    before = _shape(model)
    strategy = UlyssesDeepSpeedStrategy(
        sequence_parallel_size=2, stage=2, tiled_loss=True, tiled_mlp=True, memory_efficient_rmsnorm=True,
        memory_efficient_swiglu=True, tiled_attention_backward=True, activation_checkpoint_cpu_offload=True)
    module = CausalLMModule(model, optimizer=_sgd)
    trainer = _trainer(strategy)
    trainer.fit(module, SyntheticLMDataModule(vocab_size=64, seq_len=16, num_train_samples=4, batch_size=1))
    after = _shape(model)
    plain = _llama()
    plain.load_state_dict(model.state_dict())
    ids = (torch.arange(12) * 5 % 64).unsqueeze(0)
    with torch.no_grad():
        diff = float((model.eval()(input_ids=ids).logits - plain.eval()(input_ids=ids).logits).abs().max())
        generated = model.generate(ids, max_new_tokens=4, do_sample=False).tolist()
        expected = plain.generate(ids, max_new_tokens=4, do_sample=False).tolist()
    return {"before": before, "after": after, "logits_max_diff": diff, "generate_equal": generated == expected,
            "checkpointing_after": any(getattr(m, "gradient_checkpointing", False) for m in model.modules())}


def _mamba_module():
    from transformers import AutoConfig

    config = AutoConfig.for_model("mamba", vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2)
    return CausalLMModule(config, optimizer=_sgd)  # the default attention argument: the model's own


def mamba_auto(out: Path) -> dict:
    module = _mamba_module()
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    strategy = UlyssesDeepSpeedStrategy(stage=2)
    trainer = _trainer(strategy, callbacks=[Record()])
    trainer.fit(module, SyntheticLMDataModule(vocab_size=64, seq_len=16, num_train_samples=4, batch_size=1))
    return {"layout": [strategy.layout.sp, strategy.layout.dp], "losses": losses}


def mamba_packed(out: Path) -> dict:
    packed = {"input_ids": torch.arange(1, 17).unsqueeze(0),
              "position_ids": torch.cat([torch.arange(8), torch.arange(8)]).unsqueeze(0)}
    _trainer(UlyssesDeepSpeedStrategy(stage=2)).fit(_mamba_module(), train_dataloaders=DataLoader([packed] * 4,
                                                                                                 batch_size=None))
    return {}


def unbatched(out: Path) -> dict:
    loader = DataLoader([{"input_ids": torch.arange(1, 17)}] * 4, batch_size=None)
    _trainer(UlyssesDeepSpeedStrategy(sequence_parallel_size=2, stage=2)).fit(
        CausalLMModule(dict(LLAMA, model_type="llama"), optimizer=_sgd), train_dataloaders=loader)
    return {}


def vocab(out: Path) -> dict:
    loader = DataLoader([{"input_ids": torch.tensor([[1, 2, 3, 70, 5, 6, 7, 8]])}] * 4, batch_size=None)
    _trainer(UlyssesDeepSpeedStrategy(sequence_parallel_size=2, stage=2)).fit(
        CausalLMModule(dict(LLAMA, model_type="llama"), optimizer=_sgd), train_dataloaders=loader)
    return {}


def empty_file(out: Path) -> dict:
    empty = out / "empty.jsonl"
    empty.write_text("")
    data = SFTDataModule(str(empty), str(ROOT / "data" / "tokenizer"), seq_len=32)
    _trainer(UlyssesDeepSpeedStrategy(sequence_parallel_size=2, stage=2)).fit(
        CausalLMModule(dict(LLAMA, model_type="llama", vocab_size=512), optimizer=_sgd), data)
    return {}


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def memory_auto(out: Path) -> dict:
    """``memory="auto"`` (with the user's ``tiled_mlp=True`` kept), then the plan it chose written by hand: the same
    losses step for step."""
    runs = {}
    for how in ("auto", "by_hand"):
        flags = {"memory": "auto", "tiled_mlp": True} if how == "auto" else runs["auto"]["flags"]
        strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=2, stage=2, **flags)
        module = CausalLMModule(dict(model_type="llama", **LLAMA), attn_implementation="sdpa", optimizer=_sgd)
        losses = _Losses()
        trainer = _trainer(strategy, steps=3, callbacks=[losses])
        trainer.fit(module, SyntheticLMDataModule(vocab_size=64, seq_len=32, num_train_samples=8, batch_size=1))
        chosen = strategy.memory_estimate
        runs[how] = {"losses": losses.losses, "tricks": [repr(t) for t in strategy.memory_tricks],
                     "name": chosen.name if chosen else None, "flags": chosen.flags if chosen else None}
    return runs


class _AdapterDtypes(L.Callback):
    """The dtypes LoRA computes in during training: each ``lora_A`` weight and the input it receives."""

    def __init__(self) -> None:
        self.seen: set = set()
        self.hooks: list = []

    def on_train_start(self, trainer, pl_module) -> None:
        for name, mod in pl_module.named_modules():
            if name.endswith("lora_A.default"):
                self.hooks.append(mod.register_forward_hook(
                    lambda m, args, _out: self.seen.add((str(m.weight.dtype), str(args[0].dtype)))))

    def on_train_end(self, trainer, pl_module) -> None:
        for h in self.hooks:
            h.remove()


def lora_bf16(out: Path) -> dict:
    """LoRA adapters (PEFT builds them in fp32) under bf16-mixed at ZeRO-3 (the model built under zero.Init) and
    ZeRO-2: the dtype of each adapter's weight and input during training, and the losses."""
    runs = {}
    for stage in (3, 2):
        module = CausalLMModule(dict(model_type="llama", **LLAMA), attn_implementation="sdpa", optimizer=_sgd,
                                peft={"peft_type": "LORA", "r": 4, "target_modules": "all-linear"})
        dtypes, losses = _AdapterDtypes(), _Losses()
        trainer = _trainer(UlyssesDeepSpeedStrategy(sequence_parallel_size=2, stage=stage, tiled_mlp=True),
                           precision="bf16-mixed", callbacks=[dtypes, losses])
        trainer.fit(module, SyntheticLMDataModule(vocab_size=64, seq_len=16, num_train_samples=4, batch_size=1))
        runs[f"zero{stage}"] = {"dtypes": sorted(dtypes.seen), "losses": losses.losses}
    return runs


ENGINES = ("DeepSpeedEngine", "DeepSpeedZeroOptimizer_Stage3", "DeepSpeedZeroOptimizer")


def _alive() -> int:
    import gc

    gc.collect()
    return sum(type(o).__name__ in ENGINES for o in gc.get_objects())


def _fit_and_use(out: Path) -> dict:
    strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=2, stage=3)
    module = CausalLMModule(dict(model_type="llama", **LLAMA), attn_implementation="sdpa",
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = _trainer(strategy)
    trainer.fit(module, SyntheticLMDataModule(vocab_size=64, seq_len=16, num_train_samples=4, batch_size=1))
    with torch.no_grad():
        logits = module.model(input_ids=(torch.arange(12) % 64).unsqueeze(0)).logits
    path = out / "after_fit.ckpt"
    trainer.save_checkpoint(path)
    return {"forward_finite": bool(torch.isfinite(logits).all()), "engines_alive_while_held": _alive(),
            "optimizer_files": sorted(p.name for p in path.rglob("*optim_states*")) if path.is_dir() else []}


def released(out: Path) -> dict:
    return {**_fit_and_use(out), "engines_alive_after": _alive()}  # the user's references end with the call


def main() -> None:
    cases, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    for name in cases:
        try:
            result = {"ok": globals()[name](out)}
        except SystemExit as exc:  # another rank reports the error
            result = {"exit": exc.code}
        except Exception as exc:  # noqa: BLE001 - recorded for the test to check
            result = {"error": f"{type(exc).__name__}: {exc}"}
        (out / f"{name}.{rank}.json").write_text(json.dumps(result))
    exit_distributed()


if __name__ == "__main__":
    main()
