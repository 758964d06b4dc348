"""ZeRO-3 settings this project chooses differently from DeepSpeed's defaults, and why.

ZeRO-3 records the order in which modules ran in the first step (its "trace") and afterwards prefetches
parameters along it (``stage3_prefetch_bucket_size``, default 5e7 elements) and keeps a gathered parameter
when its next use is within ``stage3_max_reuse_distance`` elements (default 1e9: ~4.6 Llama-3-8B layers).
Under activation checkpointing the last layers' forward is followed at once by their recompute in backward,
so the trace keeps those layers gathered into backward -- where activation memory peaks: for Llama-3-8B
1.5-1.9 GiB more peak memory for no speed, since at these lengths a layer's compute hides its all-gather
without prefetching (measurements: docs/benchmarks.md, 2026-11-22, "ZeRO-3 releases parameters after use"). DeepSpeed's own ALST path, as ArcticTraining drives it, never
completes a trace (it calls the inner model, so the top module's step-ending hooks never fire) and releases
every layer after use; setting both to 0 does the same for the engine's forward.
"""

from __future__ import annotations

from typing import Any

# Both are needed: with reuse 0 alone the prefetcher still fetches the next bucket along the trace (the
# same +1.5 GiB, measured); with prefetch 0 alone the reuse window keeps the last layers (CPU, 4.3M of 13.6M
# parameters still gathered at the end of forward).
RELEASE_AFTER_USE = {"stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0}


def release_zero3_params_after_use(config: dict[str, Any]) -> dict[str, int]:
    """Under ZeRO-3, set the trace prefetch and reuse window to 0 where ``config`` does not name them.

    ``config`` is a whole DeepSpeed config (changed in place). Keys the user set win, so
    ``"stage3_prefetch_bucket_size": 5e7`` in a config brings prefetching back. Returns what it set
    (empty when not ZeRO-3 or all were given).
    """
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or int(zero.get("stage", 0) or 0) != 3:
        return {}
    chosen = {k: v for k, v in RELEASE_AFTER_USE.items() if k not in zero}
    zero.update(chosen)
    return chosen
