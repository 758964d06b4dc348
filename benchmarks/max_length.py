"""Longest sequence one configuration trains: predict it from the memory slope, confirm it with one step.

For one configuration of ``benchmarks/alst_compare.py`` (ours or the raw ALST reference, any options), on
the GPUs of this machine:

1. at each of two probe lengths, a warm-up step and a measured step (the steady-state peak: the first
   step runs without Adam's moment buffers, which torch creates at the first ``optimizer.step()``); the
   peak GPU memory (max over ranks) of each;
2. a straight line through them, ``peak(S) = a + b * S``, gives ``S_max = (budget - a) / b``, rounded
   down to ``--multiple``; the same line through the probes' host RSS against the host RAM per rank
   (activation offload moves the per-token cost to host memory) may end the sequence first;
3. the same at ``S_max``: if it fails (OOM or crash), bisect between the longest success and the shortest
   failure with at most ``--attempts`` more runs. When the probes' step times (fitted as ``a*S + b*S^2``)
   say a run at ``S_max`` would not finish within ``--timeout-s``, or one does time out, the prediction is
   reported as unconfirmed: a run cut off by the clock says nothing about memory.

Every attempt is its own ``torchrun`` process (an OOM cannot poison the next one, a hung rank is killed
by the time limit). Prints a markdown line and writes every attempt to a JSON file.

    python benchmarks/max_length.py --nproc 4 --label ours-sp4 --out max_ours.json -- \\
        --path ours --preset llama3-8b --sp 4 --checkpoint-policy full --offload --tiled-mlp --rmsnorm --swiglu \\
        --loss-impl auto --tiled-attention

Attention cost grows with ``S^2``: at a million tokens one step of a 32-layer 8B model takes far longer
than a short run; ``--layers`` (passed through) lowers depth for the prediction and the step, which is
exact for the activation part of our stack (flat in depth) but not for the reference's (it grows).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

GiB = 2**30


def attempt_command(nproc: int, seq: int, passthrough: list[str], out: Path) -> list[str]:
    """One warm-up step and one measured step at ``seq`` tokens.

    The warm-up step is not optional: torch's Adam creates its two moment buffers at the first
    ``optimizer.step()`` (DeepSpeed ZeRO-3 keeps that laziness), so a first step's forward/backward runs
    without them and its peak is too low by the optimizer state (15 GiB per H200 for an 8B model at SP=4,
    measured 2026-11-22); every later step carries them."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(Path(__file__).with_name("alst_compare.py")), *passthrough, "--seq", str(seq), "--warmup", "1",
            "--steps", "1", "--out", str(out)]


def attempt(nproc: int, seq: int, passthrough: list[str], timeout_s: float, workdir: Path) -> dict:
    """Steady-state peak at ``seq`` tokens; ``ok`` is False on OOM or crash, None on time-out (unknown)."""
    out = workdir / f"attempt_{seq}.json"
    try:
        proc = subprocess.run(attempt_command(nproc, seq, passthrough, out), capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"seq": seq, "ok": None, "reason": f"time-out after {timeout_s:.0f} s"}
    if not out.exists():
        tail = (proc.stdout + proc.stderr)[-400:].replace("\n", " ")
        return {"seq": seq, "ok": False, "reason": f"exit {proc.returncode}: {tail}"}
    r = json.loads(out.read_text())
    ok = "step_s" in r and "oom" not in r
    return {"seq": seq, "ok": ok, "peak_gib": r.get("peak_gib"), "host_gib": r.get("host_rss_gib"),
            "step_s": r.get("step_s"), "reason": None if ok else ("OOM" if "oom" in r else "no step time")}


def step_time_at(p1: tuple[int, float], p2: tuple[int, float], seq: int) -> float:
    """Step time at ``seq`` from two (length, seconds) probes, as ``a*S + b*S^2`` (dense + causal attention)."""
    (s1, t1), (s2, t2) = sorted([p1, p2])
    b = (t2 / s2 - t1 / s1) / (s2 - s1)
    a = t1 / s1 - b * s1
    return max(a, 0.0) * seq + max(b, 0.0) * seq * seq


def predict(p1: tuple[int, float], p2: tuple[int, float], budget_gib: float, multiple: int) -> int:
    """Length at which the line through two (length, peak GiB) points reaches ``budget_gib``."""
    (s1, m1), (s2, m2) = sorted([p1, p2])
    slope = (m2 - m1) / (s2 - s1)
    if slope <= 0:
        raise ValueError(f"peak memory did not grow between {s1} and {s2} tokens ({m1:.2f} -> {m2:.2f} GiB); "
                         "choose probe lengths further apart.")
    reach = s2 + (budget_gib - m2) / slope
    return max(multiple, int(reach // multiple * multiple))


def host_bound(log: list[dict], host_budget_gib: Optional[float], multiple: int) -> Optional[int]:
    """Length at which the probes' host RSS (max over ranks) reaches ``host_budget_gib`` per rank; None when
    there is no budget, no RSS, or RSS does not grow with length (nothing offloaded).

    Activation offload moves the per-token cost to host memory: our checkpointed layer inputs are
    ``2 * hidden * layers`` bytes per local token in pinned memory (256 KiB for Llama-3-8B), so on a node
    whose ranks share the host RAM, host memory and not GPU memory can end the sequence first."""
    if host_budget_gib is None or any(a.get("host_gib") is None for a in log[:2]):
        return None
    (s1, h1), (s2, h2) = sorted((a["seq"], a["host_gib"]) for a in log[:2])
    if h2 <= h1:
        return None
    return predict((s1, h1), (s2, h2), host_budget_gib, multiple)


def search(run: Callable[[int], dict], probes: tuple[int, int], budget_gib: float, multiple: int,
           attempts: int, timeout_s: Optional[float] = None, host_budget_gib: Optional[float] = None) -> dict:
    """Probe, predict, confirm, bisect. ``run(seq)`` returns an attempt dict (see :func:`attempt`).

    The prediction is the shorter of the GPU-memory line and the host-RAM line (``host_budget_gib`` per
    rank, see :func:`host_bound`); ``bound`` says which one ends it."""
    log = [run(s) for s in probes]
    bad = [a for a in log if a["ok"] is not True]
    if bad:
        return {"attempts": log, "max_ok": None, "predicted": None,
                "error": f"a probe length failed ({bad[0]['seq']}: {bad[0]['reason']}); use shorter probes"}
    gpu = predict((log[0]["seq"], log[0]["peak_gib"]), (log[1]["seq"], log[1]["peak_gib"]), budget_gib, multiple)
    host = host_bound(log, host_budget_gib, multiple)
    predicted, bound = (host, "host RAM") if host is not None and host < gpu else (gpu, "GPU memory")
    result = search_from(run, log, predicted, probes, multiple, attempts, timeout_s)
    result.update(bound=bound, predicted_gpu=gpu, predicted_host=host)
    return result


def search_from(run: Callable[[int], dict], log: list[dict], predicted: int, probes: tuple[int, int], multiple: int,
                attempts: int, timeout_s: Optional[float]) -> dict:
    """Confirm ``predicted`` with one step, bisect on failure (see :func:`search`)."""
    lo, hi = max(probes), None  # longest known success, shortest known failure
    if predicted <= lo:
        return {"attempts": log, "predicted": predicted, "max_ok": lo, "first_failure": None}
    if timeout_s is not None:
        # attention makes a step at S cost ~S^2: at millions of tokens one step takes hours, and a step cut
        # off by the time limit says nothing about memory; report the prediction as unconfirmed instead
        est = step_time_at((log[0]["seq"], log[0]["step_s"]), (log[1]["seq"], log[1]["step_s"]), predicted)
        if 2 * est > timeout_s:  # warm-up + measured step
            return {"attempts": log, "predicted": predicted, "max_ok": lo, "first_failure": None,
                    "unconfirmed": f"one step at {predicted} tokens would take ~{est:.0f} s, over the "
                                   f"{timeout_s:.0f} s limit for two"}
    seq = predicted
    for _ in range(attempts + 1):
        a = run(seq)
        log.append(a)
        if a["ok"] is None:  # timed out: memory unknown, stop rather than mistake slowness for OOM
            return {"attempts": log, "predicted": predicted, "max_ok": lo, "first_failure": hi,
                    "unconfirmed": f"{seq} tokens: {a['reason']}"}
        if a["ok"]:
            lo = seq
            if hi is None:  # the prediction held: one confirming step is the answer (longer may fit too)
                break
        else:
            hi = seq
        if hi is not None and hi - lo <= multiple:
            break
        seq = (lo + hi) // 2 // multiple * multiple if hi is not None else lo
        if seq <= lo:
            break
    return {"attempts": log, "predicted": predicted, "max_ok": lo, "first_failure": hi}


def proc_kib_field_gib(path: str, key: str) -> float:
    """A ``Key:  N kB`` line of a /proc file (``/proc/meminfo`` MemTotal, ``/proc/self/status`` VmRSS) in GiB."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / GiB
    raise RuntimeError(f"no {key} in {path}")


def host_mem_total_gib() -> float:
    try:
        return proc_kib_field_gib("/proc/meminfo", "MemTotal")
    except (OSError, RuntimeError) as e:
        raise RuntimeError(f"{e}: give --host-budget-gib") from e


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--probes", type=int, nargs=2, default=[65536, 131072])
    p.add_argument("--budget-gib", type=float, default=None,
                   help="usable GPU memory per device (default: the device's total minus --headroom-gib)")
    p.add_argument("--headroom-gib", type=float, default=3.0)
    p.add_argument("--host-budget-gib", type=float, default=None,
                   help="host RAM per rank (default: this machine's MemTotal minus --host-headroom-gib, over --nproc)")
    p.add_argument("--host-headroom-gib", type=float, default=16.0)
    p.add_argument("--multiple", type=int, default=32768, help="lengths are multiples of this")
    p.add_argument("--attempts", type=int, default=3, help="bisection steps after the predicted length fails")
    p.add_argument("--timeout-s", type=float, default=540.0, help="time limit per attempt")
    p.add_argument("--label", default="run")
    p.add_argument("--out", default="max_length.json")
    p.add_argument("passthrough", nargs=argparse.REMAINDER, help="-- then alst_compare.py options (not --seq)")
    args = p.parse_args()
    passthrough = [a for a in args.passthrough if a != "--"]
    if "--seq" in passthrough:
        p.error("--seq is chosen by the search; do not pass it through")
    budget = args.budget_gib
    if budget is None:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: give --budget-gib")
        budget = torch.cuda.get_device_properties(0).total_memory / GiB - args.headroom_gib
    host_budget = args.host_budget_gib
    if host_budget is None:
        host_budget = (host_mem_total_gib() - args.host_headroom_gib) / args.nproc
    with tempfile.TemporaryDirectory() as tmp:
        result = search(lambda s: attempt(args.nproc, s, passthrough, args.timeout_s, Path(tmp)),
                        tuple(args.probes), budget, args.multiple, args.attempts, args.timeout_s, host_budget)
    result.update(label=args.label, budget_gib=budget, host_budget_gib=host_budget, nproc=args.nproc,
                  options=passthrough)
    Path(args.out).write_text(json.dumps(result, indent=1))
    ok = [a for a in result["attempts"] if a["ok"]]
    longest = max(ok, key=lambda a: a["seq"]) if ok else None
    print("| config | GPUs | predicted | bound by | longest step that ran | its peak GiB | its host RSS GiB | its step s | "
          "first failure | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.label} | {args.nproc} | {result.get('predicted') or '-'} | {result.get('bound', '-')} | "
          f"{result.get('max_ok') or '-'} | {longest['peak_gib']:.1f} | {longest.get('host_gib') or 0:.1f} | "
          f"{longest['step_s']:.1f} | {result.get('first_failure') or '-'} | {result.get('unconfirmed', '')} |"
          if longest else f"| {args.label} | {args.nproc} | - | - | none | | | | | {result.get('error', '')} |")


if __name__ == "__main__":
    main()
