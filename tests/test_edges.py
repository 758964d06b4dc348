"""Edges a user meets on day one (issue #26): every way of building the module records how to rebuild the model
(``export`` with no flags), the model is handed back plain after ``fit``, transformers' ZeRO-3 integration is on only
while the model is built, attention-free models train data-parallel, and bad inputs get one clear error.

One launched 2-rank job (``tests/workers/edges.py``) checks the multi-process claims; the rest run in-process."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import WORKERS, worker_env

ROOT = Path(__file__).resolve().parents[1]
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
CASES = ["instance_zero3", "handed_back", "mamba_auto", "mamba_packed", "unbatched", "vocab", "empty_file", "memory_auto",
         "lora_bf16", "released"]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("edges")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKERS / "edges.py"), json.dumps(CASES), str(out)]
    proc = subprocess.run(cmd, env=worker_env(), cwd=out, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    results = {name: [json.loads((out / f"{name}.{rank}.json").read_text()) for rank in (0, 1)] for name in CASES}
    return out, results


def test_a_model_instance_is_registered_once_and_exports_with_no_flags(job) -> None:
    from transformers import AutoModelForCausalLM

    from lightning_ulysses.lightning.cli import main as cli_main

    out, results = job
    r = results["instance_zero3"][0]["ok"]
    assert r["names"] and all(n.startswith("model.") for n in r["names"]), r["names"][:4]
    assert r["hparams_model_type"] == "llama"
    with pytest.raises(SystemExit) as done:
        cli_main(["export", r["checkpoint"], str(out / "hf")])
    assert done.value.code == 0
    exported = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert exported.config.hidden_size == 32 and exported.config.num_key_value_heads == 2


def test_the_tiled_mlp_runs_no_collective_per_layer_under_zero3(job) -> None:
    _, results = job
    for rank in (0, 1):
        r = results["instance_zero3"][rank]["ok"]
        assert r["tiled_mlp_calls"] >= 8 and r["tiled_mlp_all_reduces"] == 0, r  # 2 layers x (fwd + recompute) x 2 steps


def test_zero3_integration_is_on_only_while_the_model_is_built(job) -> None:
    _, results = job
    for rank in (0, 1):
        assert results["instance_zero3"][rank]["ok"]["zero3_integration_in_training"] is False
    assert results["instance_zero3"][0]["ok"]["built_alone"] is True  # rank 0 built a plain model by itself


def test_the_model_is_handed_back_plain_after_fit(job) -> None:
    _, results = job
    for rank in (0, 1):
        r = results["handed_back"][rank]["ok"]
        assert r["after"] == r["before"], (r["before"], r["after"])  # same classes, no instance forward, no hooks
        assert r["logits_max_diff"] == 0.0 and r["generate_equal"]
        assert r["checkpointing_after"] is False


def test_lora_adapters_compute_in_bf16_at_every_zero_stage(job) -> None:
    """PEFT builds adapters in fp32; DeepSpeed casts a model to bf16 only when it was not built under zero.Init, so at
    ZeRO-3 the adapters stayed fp32 and each adapted projection cast its input to an fp32 copy kept for backward
    (one H100, 16 layers of 8B + LoRA at 262,144 tokens: 63.19 GiB peak vs 45.15 in bf16). Now bf16 as at ZeRO-2."""
    _, results = job
    for rank in (0, 1):
        runs = results["lora_bf16"][rank]["ok"]
        for stage in ("zero3", "zero2"):
            assert runs[stage]["dtypes"] == [["torch.bfloat16", "torch.bfloat16"]], (stage, runs[stage]["dtypes"])
            assert len(runs[stage]["losses"]) == 2 and all(math.isfinite(x) for x in runs[stage]["losses"])


def test_a_finished_fit_is_released_when_the_user_drops_it(job) -> None:
    """DeepSpeed's module-level stack, its coordinator cache and the optimizer's gradient hooks kept every engine of
    the process alive (~30 GiB of fp32 weights and AdamW moments per fit of 4 layers of an 8B model); the model still
    runs forward after fit and save_checkpoint still writes the optimizer state."""
    _, results = job
    for rank in (0, 1):
        r = results["released"][rank]["ok"]
        assert r["forward_finite"] and r["optimizer_files"], r
        assert r["engines_alive_while_held"] >= 1, r  # the check sees engines
        assert r["engines_alive_after"] == 0, r


def test_a_model_without_attention_trains_data_parallel_and_refuses_packed_rows(job) -> None:
    _, results = job
    r = results["mamba_auto"][0]["ok"]
    assert r["layout"] == [1, 2] and len(r["losses"]) == 2 and all(x == x for x in r["losses"])
    for rank in (0, 1):
        error = results["mamba_packed"][rank]["error"]
        assert "packed rows" in error and "MambaForCausalLM has no attention layers" in error and "pack" in error


@pytest.mark.parametrize("case, words", [
    ("unbatched", ["input_ids must be [batch, seq]", "one dimension"]),
    ("vocab", ["token id 70", "64 rows", "vocab_size"]),
    ("empty_file", ["are empty", "empty.jsonl"]),
])
def test_bad_inputs_are_reported_once_with_the_fix(job, case: str, words: list) -> None:
    _, results = job
    error = results[case][0].get("error", "")
    assert all(w in error for w in words), error
    assert results[case][1] == {"exit": 1}  # the other rank stops with one line, no second traceback


# ---------------------------------------------------------------------------------------------- in-process
def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.mark.parametrize("way", ["name", "dict", "config", "instance", "peft_model", "peft_config"])
def test_every_way_in_records_plain_data_that_rebuilds_the_model(way: str, tmp_path) -> None:
    pytest.importorskip("peft")
    import pickle

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_ulysses import CausalLMModule
    from lightning_ulysses.models.adapters import peft_config
    from lightning_ulysses.models.build import config_of

    config = LlamaConfig(**LLAMA)
    directory = tmp_path / "saved"
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    spec = {"name": str(directory), "dict": dict(LLAMA, model_type="llama"), "config": config,
            "instance": AutoModelForCausalLM.from_config(config),
            "peft_model": get_peft_model(AutoModelForCausalLM.from_config(config), _lora()),
            "peft_config": dict(LLAMA, model_type="llama")}[way]
    module = CausalLMModule(spec, peft=_lora() if way == "peft_config" else None)
    record = module.hparams["model"]
    assert isinstance(record, (str, dict)) and json.dumps(record, default=str)
    assert config_of(record).hidden_size == 32 and config_of(record).num_key_value_heads == 2
    if way in ("peft_model", "peft_config"):
        adapters = module.hparams["peft"]
        assert isinstance(adapters, dict) and adapters["peft_type"] == "LORA" and adapters["r"] == 4
        assert sorted(peft_config(adapters).target_modules) == ["q_proj", "v_proj"]
    pickle.dumps(dict(module.hparams))
    assert not any(n.startswith("model_spec") for n, _ in module.named_parameters())
    again = CausalLMModule(**dict(module.hparams))  # what load_from_checkpoint does with them
    module.configure_model(), again.configure_model()
    assert sorted(again.state_dict()) == sorted(module.state_dict())


def test_export_reads_the_model_from_the_training_yaml(tmp_path) -> None:
    from lightning_ulysses.tools.export import model_config

    assert model_config(str(ROOT / "configs" / "quickstart.yaml")).model_type == "llama"
    bare = tmp_path / "bare.yaml"
    bare.write_text("trainer: {max_steps: 1}\n")
    with pytest.raises(ValueError, match="names no model"):
        model_config(str(bare))


def test_compare_plot_without_matplotlib_is_one_error_line(tmp_path, monkeypatch, capsys) -> None:
    from lightning_ulysses.lightning.cli import main as cli_main

    for run in ("a", "b"):
        d = tmp_path / run
        d.mkdir()
        (d / "metrics.csv").write_text("step,train_loss\n1,2.0\n2,1.5\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as done:
        cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err  # compare's "cannot do what was asked"
    assert err.count("\n") == 1 and "--plot needs matplotlib" in err and "lightning-ulysses[plot]" in err


def test_memory_flags_that_contradict_each_other_are_refused() -> None:
    from lightning_ulysses import UlyssesDeepSpeedStrategy

    with pytest.raises(ValueError, match="needs checkpointing, but gradient_checkpointing=False"):
        UlyssesDeepSpeedStrategy(gradient_checkpointing=False, activation_checkpoint_cpu_offload=True)


def test_offload_that_would_keep_every_layer_is_refused() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_ulysses.memory import ActivationOffload

    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
    with pytest.raises(ValueError, match="keeps every one of LlamaForCausalLM's 2 decoder layer inputs"):
        ActivationOffload(keep_layers=2).apply(model)
    ActivationOffload(keep_layers=1).apply(model)


def test_ulysses_size_with_auto_is_the_degree_asked_for() -> None:
    from lightning_ulysses.parallel.layout import ParallelLayout

    layout = ParallelLayout.resolve("auto", 4, 4, 2, "sdpa", ulysses_size=2)
    assert (layout.sp, layout.ulysses, layout.ring, layout.dp) == (2, 2, 1, 2)
    layout = ParallelLayout.resolve("auto", 4, 4, 2, "sdpa", ring_size=2)
    assert (layout.sp, layout.ring) == (2, 2)


def test_token_ids_beyond_the_vocabulary_are_refused() -> None:
    from lightning_ulysses.parallel.sharding import check_token_ids

    check_token_ids(torch.tensor([[0, 63]]), 64)
    with pytest.raises(ValueError, match="token id 64, but the model's embedding has 64 rows"):
        check_token_ids(torch.tensor([[0, 64]]), 64)


def test_a_tokenizer_json_without_eos_takes_one_from_the_data_module(tmp_path) -> None:
    from lightning_ulysses.data import SFTDataModule
    from lightning_ulysses.data.tokenizer import load_tokenizer

    file = str(ROOT / "data" / "tokenizer" / "tokenizer.json")
    with pytest.raises(ValueError, match=re.escape("eos_token='<|endoftext|>' on the data module")):
        load_tokenizer(file)
    assert load_tokenizer(file, eos_token="<|end|>").eos_token == "<|end|>"
    with pytest.raises(ValueError, match="not a token of the tokenizer"):
        load_tokenizer(file, eos_token="<nope>")
    data = SFTDataModule(str(ROOT / "data" / "prompt_completion.jsonl"), file, seq_len=64, eos_token="<|end|>",
                         val_size=0)
    data.setup("fit")
    assert data.tokenizer.eos_token == "<|end|>" and len(data.train_dataloader()) > 0


def test_the_tiled_loss_causes_no_transformers_deprecation_warning(monkeypatch) -> None:
    """The quickstart printed transformers' `past_key_values` deprecation twice per rank: the tiled loss built its
    output with the old field name. Recorded through transformers' own logger (its warning_once is cached per
    process, so the call itself is what is checked)."""
    import transformers.utils.generic as generic
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_ulysses.memory import TiledLoss

    said: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(str(msg)))
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
    TiledLoss(tile_tokens=4).apply(model)
    ids = torch.arange(1, 13).unsqueeze(0)
    out = model(input_ids=ids, position_ids=torch.arange(12).unsqueeze(0), shift_labels=torch.roll(ids, -1, 1))
    out.loss.backward()
    assert not [m for m in said if "past_key_values" in m], said


def test_memory_auto_trains_like_the_plan_it_chose_set_by_hand(job) -> None:
    for rank in (0, 1):
        runs = job[1]["memory_auto"][rank]["ok"]
        auto, by_hand = runs["auto"], runs["by_hand"]
        assert auto["flags"]["tiled_mlp"] is True  # the user's flag stays in the chosen plan
        assert auto["tricks"] == by_hand["tricks"] and any("TiledMLP" in t for t in auto["tricks"])
        assert by_hand["name"] is None and len(auto["losses"]) == 3
        assert auto["losses"] == by_hand["losses"]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_fits_on_one_module_continue_where_the_first_stopped(stage: int) -> None:
    """Staged training (e.g. a short-context phase, then a long one with checkpointing) on the same module: the second
    fit's engine starts from the first's weights, and nothing of the first engine (its gradient hooks) acts in the
    second, so the losses are those of one fit over both loaders' rows (plain SGD, the loaders' own order)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 64, (1, 32), generator=g)} for _ in range(4)]

    class Keep(L.Callback):
        losses: list = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

    def fit(module, data: list, checkpointing: bool) -> list:
        keep = Keep()
        keep.losses = []
        trainer = L.Trainer(strategy=UlyssesDeepSpeedStrategy(sequence_parallel_size=1, stage=stage,
                                                              gradient_checkpointing=checkpointing),
                            accelerator="cpu", devices=1, max_steps=len(data), logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, callbacks=[keep],
                            use_distributed_sampler=False)
        trainer.fit(module, DataLoader([{**r, "labels": r["input_ids"]} for r in data], batch_size=None))
        return keep.losses

    def module() -> CausalLMModule:
        torch.manual_seed(0)
        return CausalLMModule(dict(model_type="llama", **LLAMA), attn_implementation="sdpa",
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.5))

    one = fit(module(), rows, False)
    staged = module()
    two = fit(staged, rows[:2], False) + fit(staged, rows[2:], True)
    assert len(one) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=0, atol=1e-6)
