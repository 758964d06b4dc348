"""benchmarks/max_length.py: prediction from two probes, confirmation, bisection (logic only; GPU runs in docs)."""

from __future__ import annotations

import pytest

from pathlib import Path

from benchmarks.max_length import attempt_command, predict, search, step_time_at

K = 1024


def fake(peak_of, budget: float, step_of=lambda s: s / 1e5):
    calls: list[int] = []

    def run(seq: int) -> dict:
        calls.append(seq)
        peak = peak_of(seq)
        if peak > budget:
            return {"seq": seq, "ok": False, "reason": "OOM"}
        return {"seq": seq, "ok": True, "peak_gib": peak, "step_s": step_of(seq)}

    return run, calls


def test_prediction_is_the_line_through_the_probes_rounded_down() -> None:
    assert predict((64 * K, 10 + 6.4), (128 * K, 10 + 12.8), budget_gib=110.0, multiple=32 * K) == 992 * K  # 1000K, rounded down
    with pytest.raises(ValueError, match="did not grow"):
        predict((64 * K, 12.0), (128 * K, 12.0), 100.0, 32 * K)


def test_linear_memory_is_confirmed_with_one_step() -> None:
    run, calls = fake(lambda s: 10 + 0.1 * s / K, budget=110.0)
    r = search(run, (64 * K, 128 * K), 110.0, 32 * K, attempts=3)
    assert r["predicted"] == r["max_ok"] == 1000 * K // (32 * K) * (32 * K)
    assert calls == [64 * K, 128 * K, r["predicted"]]


def test_a_prediction_that_fails_is_bisected_within_the_attempts() -> None:
    # memory grows faster than the probes suggest: the line overshoots
    run, calls = fake(lambda s: 10 + 0.1 * s / K + 2e-5 * (s / K) ** 2, budget=110.0)
    r = search(run, (64 * K, 128 * K), 110.0, 32 * K, attempts=4)
    assert r["first_failure"] is not None and r["max_ok"] < r["predicted"]
    ok = [a["seq"] for a in r["attempts"] if a["ok"]]
    assert max(ok) == r["max_ok"] and len(calls) <= 2 + 5


def test_a_failing_probe_is_reported_not_extrapolated() -> None:
    run, _ = fake(lambda s: 10 + 0.1 * s / K, budget=15.0)
    r = search(run, (64 * K, 128 * K), 15.0, 32 * K, attempts=3)
    assert r["max_ok"] is None and "probe length failed" in r["error"]


def test_every_attempt_measures_the_steady_state_step() -> None:
    # a first step runs without Adam's moment buffers (created at the first optimizer.step): its peak is too low
    cmd = attempt_command(4, 131072, ["--path", "ours"], Path("out.json"))
    assert cmd[cmd.index("--warmup") + 1] == "1" and cmd[cmd.index("--steps") + 1] == "1"
    assert cmd[cmd.index("--seq") + 1] == "131072" and "--nproc_per_node=4" in cmd


def test_a_prediction_too_slow_to_confirm_is_reported_unconfirmed() -> None:
    # probes' step times follow a*S + b*S^2 (1 s and 4 s); a ~10M-token step would take hours
    run, calls = fake(lambda s: 10 + 0.01 * s / K, budget=110.0, step_of=lambda s: (s / (64 * K)) ** 2)
    r = search(run, (64 * K, 128 * K), 110.0, 32 * K, attempts=3, timeout_s=540.0)
    assert calls == [64 * K, 128 * K] and r["max_ok"] == 128 * K and "over the 540 s limit" in r["unconfirmed"]
    assert abs(step_time_at((1000, 1.0 + 1.0), (2000, 2.0 + 4.0), 4000) - (4.0 + 16.0)) < 1e-9


def test_a_time_out_is_not_taken_for_an_oom() -> None:
    def run(seq: int) -> dict:
        if seq > 128 * K:
            return {"seq": seq, "ok": None, "reason": "time-out after 540 s"}
        return {"seq": seq, "ok": True, "peak_gib": 10 + 0.1 * seq / K, "step_s": 1.0}

    r = search(run, (64 * K, 128 * K), 110.0, 32 * K, attempts=3)
    assert r["first_failure"] is None and r["max_ok"] == 128 * K and "time-out" in r["unconfirmed"]


def test_host_ram_can_end_the_sequence_first() -> None:
    # activation offload: flat GPU memory per token, 0.25 GiB of pinned host memory per 1K tokens per rank
    def run(seq: int) -> dict:
        return {"seq": seq, "ok": True, "peak_gib": 40 + 0.01 * seq / K, "host_gib": 3 + 0.25 * seq / K, "step_s": 1.0}

    r = search(run, (64 * K, 128 * K), 137.0, 32 * K, attempts=0, host_budget_gib=120.0)
    assert r["bound"] == "host RAM" and r["predicted"] == r["predicted_host"] == 448 * K  # (120 - 3) / 0.25 = 468K
    assert r["predicted_gpu"] == 9696 * K
    # no budget, or RSS that does not grow (nothing offloaded): the GPU line alone
    assert search(run, (64 * K, 128 * K), 137.0, 32 * K, attempts=0)["bound"] == "GPU memory"
    flat = lambda s: {**run(s), "host_gib": 5.0}  # noqa: E731
    assert search(flat, (64 * K, 128 * K), 137.0, 32 * K, attempts=0, host_budget_gib=1.0)["bound"] == "GPU memory"
