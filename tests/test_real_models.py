"""Real models (issue #15): a pretrained checkpoint (``save_pretrained``, pad token set) trained through the
strategy equals plain transformers on the same data, at ZeRO-2 and ZeRO-3 (where it is loaded straight into the
partitions); a model built from a config under ZeRO-3 gets transformers' own init; LoRA adapters through
``CausalLMModule(peft=...)`` train exactly like a single-process PEFT model, base weights untouched.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_cases, run_workers
from tests.workers.parity import tiny_config

BASE = dict(seq_len=16, lr=0.5, steps=3, heads=4, kv_heads=2)
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
LORA_LR = 2.0  # adapters start at B = 0 and move slowly; a larger step makes "they moved" unambiguous


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny Llama saved the way users get models: save_pretrained, with a pad token."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    config = tiny_config(BASE)
    config.pad_token_id = 0
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return str(path)


LORA_CASES = {
    "sp2_zero2_tiled_mlp_offload_swiglu": (2, dict(sp=2, stage=2, tiled_mlp=True, mlp_tile_tokens=3, offload=True, swiglu=True)),
    "sp2_dp2_zero3_tiled_mlp_offload": (4, dict(sp=2, stage=3, tiled_mlp=True, mlp_tile_tokens=3, offload=True)),
}


@pytest.fixture(scope="module")
def parity(checkpoint: str, tmp_path_factory):
    """``parity(name) -> (world size, case, result)``; the cases of one world size run in one launched job."""
    every = {f"pretrained_zero{stage}": (2, {**BASE, "sp": 2, "stage": stage, "pretrained": checkpoint}) for stage in (2, 3)}
    every.update({name: (ws, {**BASE, **case, "pretrained": checkpoint, "lora": LORA, "lr": LORA_LR})
                  for name, (ws, case) in LORA_CASES.items()})
    jobs: dict[int, dict] = {}

    def result(name: str) -> tuple[int, dict, dict]:
        ws, case = every[name]
        if ws not in jobs:
            cases = {n: c for n, (w, c) in every.items() if w == ws}
            jobs[ws] = run_cases(cases, ws, tmp_path_factory.mktemp(f"real_world{ws}"))
        if isinstance(jobs[ws][name], str):
            raise AssertionError(jobs[ws][name])
        return ws, case, jobs[ws][name]

    return result


def _check_parity(r: dict, case: dict, ws: int) -> None:
    sp = case["sp"]
    tol = 1e-4 if case["stage"] == 3 else 1e-5
    worst = max(r["grad_rel_err"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-5, f"gradient of {worst[0]} differs by {worst[1]:.2e} (relative)"
    for k, losses in enumerate(r["sp_losses"]):
        for rank in range(ws):
            assert abs(losses[rank] - r["ref_losses"][k][rank // sp]) <= tol, (k, rank, losses, r["ref_losses"][k])
    worst = max(r["param_max_abs_err"].items(), key=lambda kv: kv[1])
    assert worst[1] <= tol, f"final {worst[0]} differs by {worst[1]:.2e}"
    assert max(r["param_moved"].values()) > 1000 * tol
    # trained in train mode (from_pretrained hands back eval mode, where HF skips gradient checkpointing)
    assert all(m["train_mode"] for m in r["memory"]), "the model trained in eval mode"


@pytest.mark.parametrize("stage", [2, 3])
def test_pretrained_checkpoint_trains_like_plain_transformers(stage: int, parity) -> None:
    ws, case, r = parity(f"pretrained_zero{stage}")
    _check_parity(r, case, ws)


@pytest.mark.parametrize("name", list(LORA_CASES))
def test_lora_through_the_module_matches_a_single_process_peft_model(name: str, parity) -> None:
    pytest.importorskip("peft")
    ws, case, r = parity(name)
    _check_parity(r, case, ws)
    assert r["trainable"] and all("lora_" in n for n in r["trainable"]), r["trainable"]
    # only the adapters moved; the base weights are bit-identical to the checkpoint's
    base = {n: e for n, e in r["param_max_abs_err"].items() if "lora_" not in n}
    assert base and max(base.values()) == 0.0
    assert max(v for n, v in r["param_moved"].items() if "lora_" not in n) == 0.0


def test_zero3_from_config_gets_transformers_init_partitioned_and_equal_on_all_ranks(tmp_path) -> None:
    r = run_workers("init_stats.py", 2, {}, tmp_path)
    ranks, plain = r["ranks"], r["plain"]
    assert all(x["partitioned"] for x in ranks), "a rank held whole parameters after configure_model"
    assert ranks[0]["stats"] == ranks[1]["stats"], "ranks disagree on the initial weights"
    for name, (mean, std) in plain.items():
        got_mean, got_std = ranks[0]["stats"][name]
        if std == 0.0:  # e.g. norms initialised to ones
            assert got_std == 0.0 and got_mean == pytest.approx(mean), name
        else:  # the model's own init ran (std 0.02 from initializer_range, not torch's defaults)
            assert got_std == pytest.approx(std, rel=0.15), (name, got_std, std)
            assert abs(got_mean - mean) < 0.01, name
    # the padding row of the embedding is zero (HF's init), not an IndexError on an empty partition
    assert ranks[0]["pad_row"] == 0.0
    assert len(ranks[0]["losses"]) == 2 and all(l == l for l in ranks[0]["losses"])
