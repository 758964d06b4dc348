"""Multi-process worker: train through ``Trainer(strategy=UlyssesDeepSpeedStrategy)`` and record what
rank 0 needs to compare against a plain single-process reference.

Launched by ``tests/harness.py`` as ``torchrun --standalone --nproc_per_node=WS parity.py CASE_JSON OUT_JSON``.
Rank 0 then replays the *same samples in the same order* (read back from the batches the ranks really
received) through an untouched HF model with the same optimizer, and writes both sides to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import lightning_ulysses  # noqa: E402,F401
from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy  # noqa: E402
from lightning_ulysses.lightning.callbacks import SequenceThroughput  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402
from lightning_ulysses.memory.activation_checkpoint import checkpoint_policy_of, is_checkpointing, saved_attention_fraction  # noqa: E402
from lightning_ulysses.memory.rmsnorm import memory_efficient_rmsnorm_enabled  # noqa: E402
from lightning_ulysses.memory.swiglu import memory_efficient_swiglu_enabled  # noqa: E402
from lightning_ulysses.memory.offload import activation_offloader  # noqa: E402
from lightning_ulysses.memory.tiled_attention import tiled_attention_of  # noqa: E402
import lightning_ulysses.parallel.ulysses as ulysses_attention  # noqa: E402

# count dense [S, S] masks the Ulysses path builds (packed rows must not need one)
DENSE_MASKS = [0]
_causal_mask = ulysses_attention.causal_mask


def _counting_causal_mask(*args, **kwargs):
    DENSE_MASKS[0] += 1
    return _causal_mask(*args, **kwargs)


ulysses_attention.causal_mask = _counting_causal_mask
from lightning_ulysses.memory.tiled_loss import tiled_loss_enabled  # noqa: E402
from lightning_ulysses.memory.tiled_mlp import tiled_mlp_enabled  # noqa: E402


# Per-family extras for tiny configs (the issue #15 matrix); every family shares the sizes below.
FAMILY_EXTRAS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    # soft-capping at scales these tiny models' scores and logits reach (0.01-0.1), so that it changes them
    "gemma2": {"sliding_window": 8, "query_pre_attn_scalar": 8, "attn_logit_softcapping": 0.005,
               "final_logit_softcapping": 0.5},
    "gemma3_text": {"sliding_window": 8, "query_pre_attn_scalar": 8},  # sliding-window layers
    "phi3": {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1},  # fused qkv_proj / gate_up_proj
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_next": {},  # linear attention (gated delta net) hybrid: refused under SP
    "falcon_h1": {},  # Mamba-2 + attention hybrid: refused under SP
}


def tiny_config(case: dict):
    from transformers import AutoConfig, LlamaConfig

    family = case.get("family", "llama")
    if family != "llama":
        return AutoConfig.for_model(
            family, vocab_size=case.get("vocab", 96), hidden_size=case.get("hidden", 32),
            intermediate_size=case.get("intermediate", 64), num_hidden_layers=case.get("layers", 2),
            num_attention_heads=case["heads"], num_key_value_heads=case.get("kv_heads", case["heads"]),
            head_dim=case.get("head_dim", 8), max_position_embeddings=1024, tie_word_embeddings=False,
            attn_implementation=case.get("attn", "sdpa"), **{**FAMILY_EXTRAS[family], **case.get("config", {})},
        )
    return LlamaConfig(
        vocab_size=case.get("vocab", 96),
        hidden_size=case.get("hidden", 32),
        intermediate_size=case.get("intermediate", 64),
        num_hidden_layers=case.get("layers", 2),
        num_attention_heads=case["heads"],
        num_key_value_heads=case.get("kv_heads", case["heads"]),
        head_dim=case.get("head_dim", 8),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        attn_implementation=case.get("attn", "sdpa"),
    )


def build_model(case: dict):
    """The reference model (and, unless the case loads a checkpoint, the strategy's too)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(case.get("seed", 0))
    if case.get("pretrained"):
        model = AutoModelForCausalLM.from_pretrained(case["pretrained"], attn_implementation=case.get("attn", "sdpa"),
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(case), attn_implementation=case.get("attn", "sdpa"),
                                                 dtype=torch.float32)
    if case.get("lora"):
        # CausalLMModule builds its adapters the same way (re-seeded, then get_peft_model), so both start equal
        from peft import get_peft_model

        from lightning_ulysses.models.adapters import peft_config

        torch.manual_seed(case.get("seed", 0))
        model = get_peft_model(model, peft_config(dict(case["lora"])))
    return model


def module_model_spec(case: dict):
    """What the strategy side hands CausalLMModule: a checkpoint path (loaded in configure_model, under ZeRO-3
    straight into the partitions) or a model instance; adapters as a config (built in configure_model)."""
    if case.get("pretrained"):
        return case["pretrained"]
    return build_model({k: v for k, v in case.items() if k != "lora"})


class Samples(Dataset):
    """Deterministic samples: random tokens, optionally right-padded or packed."""

    def __init__(self, case: dict, n: int) -> None:
        g = torch.Generator().manual_seed(1234)
        L_ = case["seq_len"]
        self.items = []
        for i in range(n):
            ids = torch.randint(1, case.get("vocab", 96), (L_,), generator=g)
            item = {"input_ids": ids, "labels": ids.clone(), "idx": torch.tensor(i)}
            if case.get("padded"):
                real = int(torch.randint(L_ // 2, L_ + 1, (1,), generator=g))
                mask = torch.zeros(L_, dtype=torch.long)
                mask[:real] = 1
                item["attention_mask"] = mask
                item["labels"][real:] = -100
            if case.get("packed"):
                cuts = sorted(set(torch.randint(2, L_ - 1, (2,), generator=g).tolist()))
                pos = torch.arange(L_)
                for c in cuts:
                    pos[c:] = torch.arange(L_ - c)
                item["position_ids"] = pos
                # no cross-document prediction: first token of each document is not a target
                for c in cuts:
                    item["labels"][c] = -100
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.grads: dict[str, torch.Tensor] = {}
        self.logged: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        acc = trainer.accumulate_grad_batches
        if (batch_idx + 1) % acc == 0 or batch_idx + 1 == trainer.num_training_batches:
            self.logged.append(float(trainer.callback_metrics["train_loss"]))
        self.steps.append(
            {
                # Lightning hands back the loss divided by accumulate_grad_batches
                "loss": float(outputs["loss"]) * acc,
                "idx": batch["idx"].tolist(),
                "local_seq": int(batch["input_ids"].shape[1]),
                "first_pos": int(batch["position_ids"][0, 0]) if "position_ids" in batch else 0,
                "tiled": tiled_loss_enabled(pl_module.model),
                "tiled_mlp": tiled_mlp_enabled(pl_module.model),
                "swiglu": memory_efficient_swiglu_enabled(pl_module.model),
                "rmsnorm": memory_efficient_rmsnorm_enabled(pl_module.model),
                # cumulative calls that took the tiled-backward path (None: option off)
                "tiled_attn_calls": getattr(tiled_attention_of(pl_module.model), "calls", None),
                "checkpointing": is_checkpointing(pl_module.model),
                # HF layers skip checkpointing (and dropout) in eval mode: from_pretrained returns eval mode
                "train_mode": pl_module.model.training and all(m.training for m in pl_module.model.modules()),
                "policy": checkpoint_policy_of(pl_module.model),
                "saved_attention": saved_attention_fraction(pl_module.model),
                **self._offload_stats(pl_module.model),
            }
        )

    @staticmethod
    def _offload_stats(model) -> dict:
        off = activation_offloader(model)
        if off is None:
            return {"offloaded": None}
        # recorded after backward and the optimizer step: every offloaded input came back, none is left
        return {
            "offloaded": off.stats.offloaded,
            "restored": off.stats.restored,
            "prefetch_points": off.stats.prefetch_points,
            "live": off.live_records,
            "stored_devices": sorted({d for _, d in off.stats.stored}),
            "stored_last_dims": sorted({shape[-1] for shape, _ in off.stats.stored}),
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads:
            return
        from deepspeed.utils import safe_get_full_grad

        for name, p in pl_module.model.named_parameters():
            if p.requires_grad:  # frozen (PEFT base) weights have no gradient
                g = safe_get_full_grad(p)
                self.grads[name] = g.detach().float().cpu().clone()


class FailOnPurpose(L.Callback):
    """Failure tests: one rank raises, or is SIGKILLed, at the start of a given optimizer step."""

    def __init__(self, rank: int, step: int, mode: str) -> None:
        self.rank, self.step, self.mode = rank, step, mode

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if self.mode == "kill":
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"deliberate failure on rank {self.rank} at step {self.step}")


def full_params(module: torch.nn.Module, stage: int) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().cpu().clone() for n, p in params.items()}
    return {n: p.detach().float().cpu().clone() for n, p in params.items()}


def reference(case: dict, dataset: Samples, micro_groups: list[list[list[int]]], acc: int) -> dict:
    """Plain HF model, one process, what DDP computes: optimizer step k takes micro-batches
    ``[k*acc, (k+1)*acc)``; each has one sample list per DP group.

    ``batch_mean``: the step's loss is the mean of every (micro-batch, group) HF token-mean loss.
    ``global_tokens``: it is the sum of all their token losses over all their valid tokens (HF's
    ``num_items_in_batch``).
    """
    # the reference may attend with another kernel (flash cases: sdpa, which separates packed samples itself)
    model = build_model({**case, "attn": case.get("ref_attn", case.get("attn", "sdpa"))})
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=case["lr"])
    global_tokens = case.get("loss_normalization") == "global_tokens"

    def collate(idxs):
        items = [dataset[i] for i in idxs]
        return {key: torch.stack([it[key] for it in items]) for key in items[0] if key != "idx"}

    def valid_tokens(batch) -> int:
        labels = batch["labels"].masked_fill(batch.get("attention_mask", torch.ones_like(batch["labels"])) == 0, -100)
        return int((labels[:, 1:] != -100).sum())

    losses, grads, step_losses = [], {}, []
    for k in range(0, len(micro_groups), acc):
        window = micro_groups[k : k + acc]
        opt.zero_grad()
        batches = [[collate(idxs) for idxs in groups] for groups in window]
        n_total = sum(valid_tokens(b) for groups in batches for b in groups)
        terms, means = [], []
        for groups in batches:
            row = []
            for batch in groups:
                out = model(**batch, use_cache=False)
                row.append(float(out.loss))
                if global_tokens:
                    n = valid_tokens(batch)
                    terms.append(out.loss * n / max(n_total, 1))
                else:
                    terms.append(out.loss)
            means.append(row)
        # Lightning (DDP or this strategy) divides every micro-batch's loss by accumulate_grad_batches, also in
        # an epoch's short last window; the step's logged loss is the mean over the micro-batches it had.
        loss = torch.stack(terms).sum() if global_tokens else torch.stack(terms).sum() / (acc * len(window[0]))
        loss.backward()
        if k == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        losses.extend(means)
        step_losses.append(float(loss) if global_tokens else float(torch.stack(terms).mean()))
    return {
        "losses": losses,
        "step_losses": step_losses,
        "grads": grads,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "model": model,
    }


@torch.no_grad()
def reference_eval(model: torch.nn.Module, dataset: Samples, n: int) -> float:
    model.eval()
    losses = []
    for i in range(n):
        item = dataset[i]
        batch = {k: v.unsqueeze(0) for k, v in item.items() if k != "idx"}
        losses.append(float(model(**batch, use_cache=False).loss))
    return sum(losses) / len(losses)


def main() -> None:
    run(json.loads(sys.argv[1]), sys.argv[2])
    # Every rank waits for rank 0's reference, then tears the groups down before the interpreter exits.
    # Only on success: a rank that failed must exit (its closed sockets end its peers' collectives), not wait
    # in a barrier that the others, stuck in the collective it left, never reach.
    exit_distributed()


def run(case: dict, out_path: str) -> None:
    ws = int(os.environ["WORLD_SIZE"])
    sp, bs, steps = case["sp"], case.get("batch_size", 1), case.get("steps", 4)
    acc = case.get("accumulate", 1)
    dp = ws // sp
    epochs = case.get("epochs", 1)
    dataset = Samples(case, n=case.get("samples", steps * dp * bs * acc // epochs))
    if case.get("attn", "").startswith("flash") and not torch.cuda.is_available():
        from tests import fake_flash  # transformers' flash path with torch kernels underneath (no flash-attn on CPU)

        fake_flash.install()

    if case.get("raw_reduction"):
        # measure DeepSpeed's own reduction: no correction factor at all
        import lightning_ulysses.lightning.strategy as strategy_mod

        strategy_mod.deepspeed_loss_scale = lambda *args, **kwargs: 1.0
    zero = {"stage": case["stage"]}
    zero.update(case.get("zero", {}))
    strategy = UlyssesDeepSpeedStrategy(
        sequence_parallel_size=case.get("sp_arg", sp),
        stage=case["stage"],
        config={
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "train_micro_batch_size_per_gpu": bs,
            "gradient_clipping": 0.0,
        },
        pad_to_multiple_of=case.get("pad_to_multiple_of"),
        tiled_loss=case.get("tiled_loss"),
        tiled_loss_tile_tokens=case.get("tile_tokens"),
        activation_checkpoint_cpu_offload=case.get("offload", False),
        tiled_mlp=case.get("tiled_mlp", False),
        tiled_mlp_tile_tokens=case.get("mlp_tile_tokens"),
        memory_efficient_rmsnorm=case.get("rmsnorm", False),
        memory_efficient_swiglu=case.get("swiglu", False),
        tiled_attention_backward=case.get("attn_tile_tokens") is not None,
        tiled_attention_tile_tokens=case.get("attn_tile_tokens"),
        seq_parallel_communication_data_type=case.get("comm_dtype"),
        context_parallel_mode=case.get("mode", "auto"),
        checkpoint_policy=case.get("checkpoint_policy", "full"),
        save_attention_layers=case.get("save_attention_layers"),
        ulysses_size=case.get("ulysses_size"),
        ring_size=case.get("ring_size"),
        ring_zigzag=case.get("zigzag", True),
        loss_normalization=case.get("loss_normalization", "batch_mean"),
        timeout=case.get("timeout", 1800.0),
    )
    module = CausalLMModule(
        model=module_model_spec(case),
        attn_implementation=case.get("attn", "sdpa"),
        dtype="float32",
        peft=dict(case["lora"]) if case.get("lora") else None,
        optimizer=lambda p: torch.optim.SGD(p, lr=case["lr"]),
        gradient_checkpointing=case.get("gradient_checkpointing"),
    )
    rec = Recorder()
    throughput = SequenceThroughput()
    callbacks = [rec, throughput]
    if case.get("fail_rank") is not None:
        callbacks.append(FailOnPurpose(case["fail_rank"], case.get("fail_step", 1), case.get("fail_mode", "raise")))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ws))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=local,
        num_nodes=ws // local,
        strategy=strategy,
        max_steps=steps,
        accumulate_grad_batches=acc,
        precision=case.get("precision", "32-true"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(dataset, batch_size=bs, shuffle=False))
    final = full_params(module.model, case["stage"])
    val_loss = test_loss = None
    if case.get("validate"):
        # the validation loader is split over DP groups only, and its batches are sharded too
        metrics = trainer.validate(module, dataloaders=DataLoader(dataset, batch_size=1), verbose=False)
        val_loss = metrics[0]["val_loss"]
        test_loss = trainer.test(module, dataloaders=DataLoader(dataset, batch_size=1), verbose=False)[0]["test_loss"]

    rank = dist.get_rank()
    gathered = [None] * ws
    dist.all_gather_object(gathered, rec.steps)
    flash_calls = [None] * ws
    dist.all_gather_object(flash_calls, dict(sys.modules["tests.fake_flash"].CALLS) if "tests.fake_flash" in sys.modules else None)
    if rank != 0:
        return
    layout = strategy.layout
    micro = len(gathered[0])
    # micro-batch j: the samples each DP group used, read from its first SP rank; every SP rank must agree
    step_groups = []
    for k in range(micro):
        groups = []
        for g in range(dp):
            ranks = range(g * sp, (g + 1) * sp)
            seen = [gathered[r][k]["idx"] for r in ranks]
            assert all(s == seen[0] for s in seen), f"SP ranks of group {g} saw different samples at step {k}: {seen}"
            groups.append(seen[0])
        step_groups.append(groups)
    ref = reference(case, dataset, step_groups, acc)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp(min=1e-12))

    result = {
        "dense_masks": DENSE_MASKS[0],
        "flash_calls": flash_calls,  # per rank, the fake flash kernels' calls in training (flash cases on CPU)
        "layout": {"sp": layout.sp, "dp": layout.dp, "ring": layout.ring},
        "local_seq": [[s["local_seq"] for s in steps_] for steps_ in gathered],
        "first_pos": [[s["first_pos"] for s in steps_] for steps_ in gathered],
        "sp_losses": [[gathered[r][k]["loss"] for r in range(ws)] for k in range(micro)],
        "ref_losses": ref["losses"],
        "ref_step_losses": ref["step_losses"],
        "global_step": trainer.global_step,
        "empty_batches": strategy.empty_batches,
        "grad_rel_err": {n: rel(rec.grads[n], ref["grads"][n]) for n in ref["grads"]},
        # ||g_sp|| / ||g_ref|| over all parameters: the constant factor DeepSpeed's reduction applied
        "grad_ratio": float(
            torch.cat([rec.grads[n].flatten() for n in ref["grads"]]).norm()
            / torch.cat([ref["grads"][n].flatten() for n in ref["grads"]]).norm()
        ),
        "param_max_abs_err": {n: float((final[n] - ref["params"][n]).abs().max()) for n in ref["params"]},
        "param_moved": {n: float((ref["params"][n] - dict(build_model(case).named_parameters())[n].detach()).abs().max()) for n in ref["params"]},
        "trainable": sorted(n for n, p in module.model.named_parameters() if p.requires_grad),
        "optimizer_params": sum(len(g["params"]) for g in module.trainer.optimizers[0].param_groups)
        if hasattr(module.trainer.optimizers[0], "param_groups") else None,
        "sample_order": step_groups,
        "logged": rec.logged,
        "tokens_per_step": [m["throughput/tokens_per_sec"] * m["throughput/step_s"] for m in throughput.history],
        "memory": [
            {key: gathered[r][k].get(key) for key in ("train_mode", "tiled", "tiled_mlp", "swiglu", "rmsnorm", "tiled_attn_calls", "checkpointing", "policy", "saved_attention", "offloaded", "restored", "prefetch_points", "live", "stored_devices", "stored_last_dims")}
            for r in range(ws)
            for k in range(micro)
        ],
        "val_loss": val_loss,
        "test_loss": test_loss,
        "ref_val_loss": reference_eval(ref["model"], dataset, len(dataset)) if case.get("validate") else None,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
