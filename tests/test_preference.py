"""Preference optimisation under SP (issue #29): sequence log-probs over the SP group, the reference model, TRL's loss
definitions, the preference data module. One launched 2-rank job (``tests/workers/preference.py``) trains at sp=2;
each case is replayed here through plain single-process transformers with plain SGD: loss every step and the final
weights must match."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.harness import WORKERS, worker_env

ROOT = Path(__file__).resolve().parents[1]
LLAMA = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
LR = 0.5
CASES = [
    {"name": "dpo_sp2_zero2", "loss": "sigmoid", "sp": 2, "stage": 2},
    {"name": "ipo_sp2_zero3_checkpointing", "loss": "ipo", "sp": 2, "stage": 3, "checkpointing": True, "beta": 0.5,
     "tiled_mlp": True},
    {"name": "simpo_sp2_zero1", "loss": "simpo", "sp": 2, "stage": 1, "beta": 2.0},
    {"name": "dpo_lora_sp2_zero2", "loss": "sigmoid", "sp": 2, "stage": 2,
     "peft": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}},
    # the reference's log-probs precomputed into the data (TRL's columns): no reference model is built
    {"name": "dpo_precomputed_ref_sp2_zero2", "loss": "sigmoid", "sp": 2, "stage": 2, "precomputed": True},
    # two micro-batches per optimizer step: the step's gradient is their mean (DDP's, Lightning's accumulation)
    {"name": "dpo_accumulate2_sp2_zero2", "loss": "sigmoid", "sp": 2, "stage": 2, "accumulate": 2},
]
RING_CASES = [  # a second launched job, 4 ranks: ring attention alone, packed pairs split over the ring; sp x dp
    {"name": "dpo_ring4_zero2", "loss": "sigmoid", "sp": 4, "stage": 2, "mode": "ring_only", "devices": 4},
    {"name": "dpo_sp2_dp2_zero3", "loss": "sigmoid", "sp": 2, "stage": 3, "devices": 4},
    # pairs unpacked, so the DP groups' rows differ in length, and lm_head tiles of 2 tokens: the ranks hold different
    # tile counts, and each tile's call of the ZeRO-3 head all-gathers its weight (a rank running fewer hung the job)
    {"name": "dpo_sp2_dp2_zero3_unequal_rows", "loss": "sigmoid", "sp": 2, "stage": 3, "devices": 4,
     "packing": "none", "tile": 2},
]
RING_DISTILL_CASES = [
    # the teacher's MLP tiled too: its no-grad forward gathers ZeRO-3 weights once per tile, the same count on every rank
    {"name": "forward_kl_sp2_dp2_zero3_unequal_rows", "loss": "forward_kl", "sp": 2, "stage": 3, "devices": 4,
     "packing": "none", "tile": 2, "tiled_mlp": True},
]
DISTILL_CASES = [
    {"name": "forward_kl_sp2_zero3", "loss": "forward_kl", "sp": 2, "stage": 3, "tiled_mlp": True},
    {"name": "jsd_ce_sp2_zero2_checkpointing", "loss": "jsd", "sp": 2, "stage": 2, "checkpointing": True,
     "ce_weight": 0.3, "temperature": 2.0},
]


def _with_reference_logps(path: Path) -> str:
    """data/preferences.jsonl with TRL's precomputed columns: each completion's summed log-probs under the reference
    (the policy's initial weights at ZeRO-2: the seed-0 build), each sequence run alone (what packing keeps apart)."""
    from lightning_ulysses.data import PreferenceDataModule

    dm = PreferenceDataModule(str(ROOT / "data" / "preferences.jsonl"), str(ROOT / "data" / "tokenizer"), seq_len=128)
    dm.setup("fit")  # loads the tokenizer the worker's data module will use
    ref = _model().eval()
    lines = []
    for line in (ROOT / "data" / "preferences.jsonl").read_text().splitlines():
        sample = json.loads(line)
        values = []
        for ids, labels in dm._pair(sample):
            row = {"input_ids": [ids], "labels": [[-100] + list(labels[1:])], "position_ids": [list(range(len(ids)))]}
            with torch.no_grad():
                values.append(float(_sample_logps(ref, row)[0][0]))
        lines.append(json.dumps({**sample, "ref_chosen_logps": values[0], "ref_rejected_logps": values[1]}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("preference")
    for case in CASES:
        if case.get("precomputed"):
            case["data"] = _with_reference_logps(out / "preferences_with_ref.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKERS / "preference.py"), json.dumps(CASES + DISTILL_CASES), str(out)]
    proc = subprocess.run(cmd, env=worker_env(), cwd=out, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return {c["name"]: json.loads((out / f"{c['name']}.json").read_text()) for c in CASES + DISTILL_CASES}


def _model():
    from lightning_ulysses.models.build import build_causal_lm

    torch.manual_seed(0)  # CausalLMModule's seed: the policy and its reference copy start from these weights
    return build_causal_lm(dict(LLAMA), "sdpa", None, False)


def _sample_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference: whole rows, full logits, log-softmax, per packed sample sums (samples in row order)."""
    from lightning_ulysses.parallel.sharding import packed_segments, prepare_batch

    full = prepare_batch({k: torch.tensor(v) for k, v in batch.items()}, 1)
    # no KV cache: transformers then keeps packed samples apart (block-causal), as the strategy does
    logits = model(input_ids=full["input_ids"], position_ids=full["position_ids"], use_cache=False).logits.float()
    labels = full["shift_labels"]
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    seg = packed_segments(full["position_ids"])
    seg = torch.zeros_like(labels) if seg is None else seg
    n = int(seg.max()) + 1
    sums = torch.zeros(labels.shape[0], n).scatter_add(1, seg, logp).reshape(-1)
    counts = torch.zeros(labels.shape[0], n).scatter_add(1, seg, (labels != -100).float()).reshape(-1)
    return sums, counts


def _trl_loss(kind: str, beta: float, pc, pr, rc, rr, nc, nr) -> torch.Tensor:
    """TRL's formulas written out (DPOTrainer / CPOTrainer), independent of lightning_ulysses.alignment."""
    if kind == "sigmoid":
        return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    if kind == "ipo":
        return (((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2).mean()
    return -F.logsigmoid(beta * (pc / nc - pr / nr - 0.5 / beta)).mean()


@pytest.fixture(scope="module")
def ring_job(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("preference_ring")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(WORKERS / "preference.py"), json.dumps(RING_CASES + RING_DISTILL_CASES), str(out)]
    proc = subprocess.run(cmd, env=worker_env(), cwd=out, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return {c["name"]: json.loads((out / f"{c['name']}.json").read_text()) for c in RING_CASES + RING_DISTILL_CASES}


@pytest.mark.parametrize("case", RING_CASES, ids=lambda c: c["name"])
def test_preference_training_on_4_ranks_matches_single_process(ring_job, case) -> None:
    """Ring attention alone over 4 ranks; Ulysses sp=2 x dp=2 at ZeRO-3 (the step's gradient is the mean of both DP
    groups' pair losses)."""
    expected = "ring 4" if case.get("mode") == "ring_only" else "sp 2 x dp 2"
    assert expected in ring_job[case["name"]]["layout"]
    _check_against_single_process(ring_job[case["name"]], case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_preference_training_at_sp2_matches_single_process(job, case) -> None:
    _check_against_single_process(job[case["name"]], case)


def _check_against_single_process(result: dict, case: dict) -> None:
    beta = case.get("beta", 0.1)
    initial = {k: torch.tensor(v) for k, v in result["initial"].items()}
    if case.get("peft"):  # LoRA: the reference is the policy with its adapters disabled
        from lightning_ulysses.models.adapters import apply_peft

        policy = apply_peft(_model(), case["peft"])
        policy.load_state_dict(initial)
        ref = None
    else:
        policy, ref = _model(), _model().requires_grad_(False)
        policy.load_state_dict(initial)
        ref.load_state_dict(initial)  # the reference is the policy as it started
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=LR)
    dp_batches = result["dp_batches"]  # per DP group (the first is rank 0's); the step's gradient is their mean
    assert dp_batches[0] == result["batches"] and len(dp_batches) == case.get("devices", 2) // case["sp"]
    accumulate = case.get("accumulate", 1)
    for step in range(len(result["batches"])):
        losses = []
        for batches in dp_batches:
            batch = batches[step]
            logps, tokens = _sample_logps(policy, {k: v for k, v in batch.items() if not k.startswith("ref_")})
            with torch.no_grad():
                if ref is None:
                    with policy.disable_adapter():
                        ref_logps, _ = _sample_logps(policy, batch)
                else:
                    ref_logps, _ = _sample_logps(ref, {k: v for k, v in batch.items() if not k.startswith("ref_")})
            if case.get("precomputed"):  # the data's values, as the rows carry them: [b, pairs] -> chosen, rejected
                pairs = torch.stack([torch.tensor(batch["ref_chosen_logps"]).reshape(-1),
                                     torch.tensor(batch["ref_rejected_logps"]).reshape(-1)], 1).reshape(-1).float()
                torch.testing.assert_close(pairs, ref_logps[: pairs.numel()], rtol=1e-4, atol=1e-4)
            keep = (tokens[0::2] > 0) & (tokens[1::2] > 0)
            losses.append(_trl_loss(case["loss"], beta, logps[0::2][keep], logps[1::2][keep], ref_logps[0::2][keep],
                                    ref_logps[1::2][keep], tokens[0::2][keep], tokens[1::2][keep]))
        # Lightning hands on_train_batch_end the loss it backpropagates: divided by the accumulation count
        assert result["losses"][step] * accumulate == pytest.approx(float(losses[0]), rel=1e-4, abs=1e-5), step
        (torch.stack(losses).mean() / accumulate).backward()
        if (step + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    assert len(result["batches"]) == 3 * accumulate  # max_steps=3 optimizer steps
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            continue
        torch.testing.assert_close(torch.tensor(result["weights"][name]), p.detach(), rtol=1e-4, atol=1e-5, msg=name)
    assert set(result["metrics"][0]) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                                         "logps/chosen", "logps/rejected"}
    if case["loss"] != "simpo":  # LoRA: no second copy; precomputed: no reference at all
        assert result["ref_is_submodule"] is not bool(case.get("peft") or case.get("precomputed"))
    if result["ref_final"] is not None:  # the reference is frozen: bit-identical after training
        assert all(torch.equal(torch.tensor(v), initial[k]) for k, v in result["ref_final"].items())
    if case["stage"] == 3 and not case.get("peft"):
        assert result["ref_partitioned"]  # ZeRO-3 partitions the frozen reference like the policy
    _check_companion_tiling(result, case)


def _check_companion_tiling(result: dict, case: dict) -> None:
    """With the tiled MLP on, a frozen companion's MLP is tiled during fit (its no-grad forward) and plain after."""
    if result["companion_tiled"] is not None:
        assert result["companion_tiled"] == [bool(case.get("tiled_mlp")), False]


@pytest.mark.parametrize("case", DISTILL_CASES, ids=lambda c: c["name"])
def test_distillation_at_sp2_matches_single_process(job, case) -> None:
    """The student's loss every step and its final weights equal a plain single-process computation of TRL GKD's
    generalized JSD (written out here) on full logits."""
    _check_distillation(job[case["name"]], case)


@pytest.mark.parametrize("case", RING_DISTILL_CASES, ids=lambda c: c["name"])
def test_distillation_on_4_ranks_matches_single_process(ring_job, case) -> None:
    """sp=2 x dp=2 at ZeRO-3 with rows of unequal length (the step's gradient is the mean of both DP groups')."""
    assert "sp 2 x dp 2" in ring_job[case["name"]]["layout"]
    _check_distillation(ring_job[case["name"]], case)


def _check_distillation(result: dict, case: dict) -> None:
    import sys

    sys.path.insert(0, str(WORKERS))
    from preference import teacher  # the worker's teacher, rebuilt the same way

    student = _model()
    student.load_state_dict({k: torch.tensor(v) for k, v in result["initial"].items()})
    teach = teacher().requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=LR)
    temp, w, beta = case.get("temperature", 1.0), case.get("ce_weight", 0.0), 0.5
    from lightning_ulysses.parallel.sharding import prepare_batch

    def loss_of(batch: dict) -> torch.Tensor:
        full = prepare_batch({k: torch.tensor(v) for k, v in batch.items()}, 1)
        ids, pos, labels = full["input_ids"], full["position_ids"], full["shift_labels"]
        s_logits = student(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        with torch.no_grad():
            t_logits = teach(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        s, t = torch.log_softmax(s_logits / temp, -1), torch.log_softmax(t_logits / temp, -1)
        if case["loss"] == "forward_kl":
            div = (t.exp() * (t - s)).sum(-1)
        else:  # generalized JSD, TRL GKD
            m = torch.log(beta * t.exp() + (1 - beta) * s.exp())
            div = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
        valid = labels != -100
        ce = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                             reduction="sum")
        return ((1 - w) * (div * valid).sum() + w * ce) / valid.sum()

    dp_batches = result["dp_batches"]  # per DP group (the first is rank 0's); the step's gradient is their mean
    assert dp_batches[0] == result["batches"] and len(dp_batches) == case.get("devices", 2) // case["sp"]
    for step in range(len(result["batches"])):
        losses = [loss_of(batches[step]) for batches in dp_batches]
        assert result["losses"][step] == pytest.approx(float(losses[0]), rel=1e-4, abs=1e-5), step
        opt.zero_grad()
        torch.stack(losses).mean().backward()
        opt.step()
    for name, p in student.named_parameters():
        torch.testing.assert_close(torch.tensor(result["weights"][name]), p.detach(), rtol=1e-4, atol=1e-5, msg=name)
    if case["stage"] == 3:
        assert result["ref_partitioned"]  # the teacher is partitioned like the student
    assert result["companion_tiled"] is not None
    _check_companion_tiling(result, case)


def test_sequence_logprobs_match_log_softmax_and_are_tiled() -> None:
    from lightning_ulysses import sequence_logprobs, token_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 12, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 12))
    labels[:, :3] = -100
    seg = torch.tensor([[0] * 6 + [1] * 6, [0] * 12])
    logps, counts = sequence_logprobs(hidden, labels, head, segment_ids=seg, num_segments=2, tile_tokens=5)
    full = torch.log_softmax(head(hidden).float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    full = full * (labels != -100)
    expected = torch.stack([torch.stack([full[0, :6].sum(), full[0, 6:].sum()]), torch.stack([full[1].sum(), torch.tensor(0.)])])
    torch.testing.assert_close(logps, expected)
    assert counts.tolist() == [[3.0, 6.0], [9.0, 0.0]]
    (g,) = torch.autograd.grad(logps.sum(), hidden)
    (g_ref,) = torch.autograd.grad(expected.sum(), hidden)
    torch.testing.assert_close(g, g_ref)
    seen = []
    hook = head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        sequence_logprobs(hidden, labels, head, segment_ids=seg, num_segments=2, tile_tokens=5)
    hook.remove()
    # one call of the head for all tiles (ZeRO-3 gathers its weight once per pass); tokens without a label skip it
    assert seen == [int((labels != -100).sum())]
    logp, _ = token_logprobs(hidden, labels, head, temperature=2.0, tile_tokens=5)
    hot = torch.log_softmax(head(hidden).float() / 2.0, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    hot = hot * (labels != -100)
    torch.testing.assert_close(logp, hot)
    torch.testing.assert_close(torch.autograd.grad(logp.sum(), hidden)[0], torch.autograd.grad(hot.sum(), hidden)[0])
    _, entropy = token_logprobs(hidden, labels, head, entropy=True, tile_tokens=7)
    p = torch.softmax(head(hidden).float(), -1)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1))


def test_preference_options_and_data_are_checked(tmp_path) -> None:
    from lightning_ulysses import PreferenceModule
    from lightning_ulysses.data import PreferenceDataModule

    with pytest.raises(ValueError, match="loss_type must be one of"):
        PreferenceModule(LLAMA, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        PreferenceModule(LLAMA, beta=0)
    from lightning_ulysses import DistillationModule

    with pytest.raises(ValueError, match="divergence must be one of"):
        DistillationModule(LLAMA, LLAMA, divergence="kl")
    with pytest.raises(ValueError, match="jsd_beta must be in"):
        DistillationModule(LLAMA, LLAMA, divergence="jsd", jsd_beta=1.0)
    module = DistillationModule(LLAMA, dict(LLAMA, vocab_size=256))
    with pytest.raises(ValueError, match="teacher's vocabulary"):
        module.configure_model()
    module = PreferenceModule(LLAMA, ref_model=dict(LLAMA, vocab_size=256))
    with pytest.raises(ValueError, match="reference model's vocabulary"):
        module.configure_model()
    with pytest.raises(ValueError, match="a pair is never cut"):
        PreferenceDataModule("x.jsonl", "data/tokenizer", too_long="split")
    dm = PreferenceDataModule(str(ROOT / "data" / "preferences.jsonl"), str(ROOT / "data" / "tokenizer"), seq_len=16,
                              val_size=0)
    with pytest.raises(ValueError, match="more than seq_len=16. Raise seq_len, or set too_long='drop'"):
        dm.setup("fit")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n' * 4)
    with pytest.raises(ValueError, match="without a 'prompt' column"):
        PreferenceDataModule(str(bad), str(ROOT / "data" / "tokenizer"), val_size=0).setup("fit")


def test_conversational_pairs_with_an_implicit_prompt_keep_pairs_together() -> None:
    from lightning_ulysses.data import PreferenceDataModule

    dm = PreferenceDataModule(str(ROOT / "data" / "preferences_chat.jsonl"), str(ROOT / "data" / "tokenizer"),
                              seq_len=128, val_size=0)
    dm.setup("fit")
    for row in dm._rows["train"].rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) % 2 == 0  # whole pairs: chosen, rejected, chosen, ...
        for a, b in zip(starts[0::2], starts[1::2]):  # the prompt (user turn) is the same and carries no label
            labels = row["labels"][a:b]
            assert labels[0] == -100 and any(t != -100 for t in labels)
    assert dm.stats["train"].samples == 32 and dm.stats["train"].dropped == 0


def test_precomputed_reference_logps_travel_with_their_pairs(tmp_path) -> None:
    """TRL's ``ref_chosen_logps`` / ``ref_rejected_logps`` columns: each row carries its pairs' values in the row's
    order, batches pad them per sample (never to the token length), and bad columns or options are clear errors."""
    from torch.utils.data import DataLoader

    from lightning_ulysses import PreferenceModule
    from lightning_ulysses.data import PreferenceDataModule

    samples = [json.loads(line) for line in (ROOT / "data" / "preferences.jsonl").read_text().splitlines()]
    data = tmp_path / "with_ref.jsonl"
    data.write_text("".join(json.dumps({**s, "ref_chosen_logps": -float(i), "ref_rejected_logps": -100.0 - i}) + "\n"
                            for i, s in enumerate(samples)))
    dm = PreferenceDataModule(str(data), str(ROOT / "data" / "tokenizer"), seq_len=128, val_size=0, batch_size=2)
    dm.setup("fit")
    seen = []
    for row in dm._rows["train"].rows:
        pairs = sum(1 for p in row["position_ids"] if p == 0) // 2
        assert len(row["ref_chosen_logps"]) == len(row["ref_rejected_logps"]) == pairs
        seen += [(c, r) for c, r in zip(row["ref_chosen_logps"], row["ref_rejected_logps"])]
    assert sorted(seen) == sorted((-float(i), -100.0 - i) for i in range(len(samples)))  # each pair's own values
    batch = next(iter(DataLoader(dm._rows["train"], batch_size=2, collate_fn=dm.train_dataloader().collate_fn)))
    assert batch["ref_chosen_logps"].dtype == torch.float64
    assert batch["ref_chosen_logps"].shape[1] < batch["input_ids"].shape[1]  # per sample, not per token

    one = tmp_path / "one_column.jsonl"
    one.write_text("".join(json.dumps({**s, "ref_chosen_logps": -1.0}) + "\n" for s in samples))
    with pytest.raises(ValueError, match="'ref_chosen_logps' column but no 'ref_rejected_logps'"):
        PreferenceDataModule(str(one), str(ROOT / "data" / "tokenizer"), seq_len=128, val_size=0).setup("fit")
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({**s, "ref_chosen_logps": "x", "ref_rejected_logps": -1.0}) + "\n"
                            for s in samples))
    with pytest.raises(ValueError, match="must be numbers"):
        PreferenceDataModule(str(text), str(ROOT / "data" / "tokenizer"), seq_len=128, val_size=0).setup("fit")
    with pytest.raises(ValueError, match="give no ref_model"):
        PreferenceModule(LLAMA, ref_model=LLAMA, precomputed_ref_logps=True)
    module = PreferenceModule(LLAMA, precomputed_ref_logps=True)
    assert module.frozen_specs == []
    module.configure_model()
    assert module.ref_model is None
    plain = {k: torch.tensor(v)[None] for k, v in dm._rows["train"].rows[0].items() if not k.startswith("ref_")}
    with pytest.raises(ValueError, match="the batch has no 'ref_chosen_logps'"):
        module.compute_loss(plain)


def test_a_frozen_model_the_layout_cannot_run_is_refused_at_setup() -> None:
    """A reference / teacher next to the trained model runs at the layout chosen for the trained model: heads it
    cannot split there, or fewer positions than the run's sequences (and than the trained model), are refused."""
    from lightning_ulysses.models.build import build_causal_lm
    from lightning_ulysses.parallel.layout import ParallelLayout

    trained = build_causal_lm(dict(LLAMA), "sdpa", None, False)
    odd_heads = build_causal_lm(dict(LLAMA, num_attention_heads=6, num_key_value_heads=3, hidden_size=48), "sdpa",
                                None, False)
    short = build_causal_lm(dict(LLAMA, max_position_embeddings=64), "sdpa", None, False)
    ulysses = ParallelLayout.resolve(2, 2, 4, 2, "sdpa")
    with pytest.raises(ValueError, match="frozen model `teacher`.*Ulysses degree 2.*context_parallel_mode='ring_only'"):
        ulysses.check_companion(odd_heads, "teacher", trained)
    ParallelLayout.resolve(2, 2, 4, 2, "sdpa", mode="ring_only").check_companion(odd_heads, "teacher", trained)
    with pytest.raises(ValueError, match="handles 64 positions.*fewer than the 128 tokens"):
        ulysses.check_companion(short, "ref_model", trained, seq_len=128)
    ulysses.check_companion(short, "ref_model", trained, seq_len=64)  # the run's sequences fit
    short_policy = build_causal_lm(dict(LLAMA, max_position_embeddings=64), "sdpa", None, False)
    ulysses.check_companion(short, "ref_model", short_policy, seq_len=128)  # no shorter than the trained model


def test_preference_training_refuses_token_weighted_normalization() -> None:
    import lightning as L

    from lightning_ulysses import PreferenceModule, UlyssesDeepSpeedStrategy

    module = PreferenceModule(LLAMA)
    trainer = L.Trainer(strategy=UlyssesDeepSpeedStrategy(sequence_parallel_size=1, loss_normalization="global_tokens"),
                        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    module.trainer = trainer
    with pytest.raises(ValueError, match="preference losses are means over pairs"):
        module.setup("fit")


def test_preference_module_from_a_pretrained_directory_uses_its_weights_for_both(tmp_path) -> None:
    """A policy given as a saved directory: the reference is built from the same directory (the checkpoint's weights,
    not a seed's); the frozen companion is counted by the plan and the policy trains."""
    from lightning_ulysses import PreferenceModule

    saved = _model()
    saved.save_pretrained(tmp_path / "sft")
    module = PreferenceModule(str(tmp_path / "sft"), seed=123)
    assert module.frozen_specs == [str(tmp_path / "sft")]
    module.configure_model()
    for (name, p), r, s in zip(module.model.named_parameters(), module.ref_model.parameters(), saved.parameters()):
        assert torch.equal(p, s) and torch.equal(r, s), name
        assert p.requires_grad and not r.requires_grad


@pytest.mark.parametrize("kind", ["preference", "distillation"])
def test_losses_on_hidden_states_build_no_dense_mask_for_packed_rows(kind, monkeypatch) -> None:
    """Preference and distillation losses call the decoder directly (hidden states, not logits): transformers must
    not build its dense ``[S, S]`` block-diagonal mask for their packed rows there either (S^2 bytes, 16 GiB at 128K
    tokens, held until backward by checkpointed layers), for the policy, the reference and the teacher alike."""
    import lightning as L
    import transformers.models.llama.modeling_llama as modeling
    from torch.utils.data import DataLoader

    from lightning_ulysses import DistillationModule, PreferenceModule, UlyssesDeepSpeedStrategy

    masks = []
    build = modeling.create_causal_mask
    monkeypatch.setattr(modeling, "create_causal_mask", lambda *a, **kw: masks.append(build(*a, **kw)) or masks[-1])
    s = 256
    ids = torch.randint(3, 500, (1, s), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :16] = labels[:, s // 2 : s // 2 + 16] = -100  # each pair member's prompt
    row = {"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(s // 2)] * 2)[None]}
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    module = (PreferenceModule(LLAMA, optimizer=sgd) if kind == "preference"
              else DistillationModule(LLAMA, teacher=LLAMA, optimizer=sgd))
    trainer = L.Trainer(strategy=UlyssesDeepSpeedStrategy(sequence_parallel_size=1, stage=2), accelerator="cpu",
                        devices=1, max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(module, DataLoader([row], batch_size=None))
    assert len(masks) == 2 and all(m is None for m in masks), [None if m is None else tuple(m.shape) for m in masks]
