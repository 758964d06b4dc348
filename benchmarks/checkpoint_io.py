"""Checkpoint I/O of 8B-width Llama models on one GPU: DeepSpeed save (every rank writes its shards; staging +
manifest + rename), resume (load), HFExport (weights gathered one parameter at a time into rank 0's host memory +
save_pretrained) and the universal conversion used by a resume at another world size. Time, size on disk and the
process's host-memory peak (RSS sampled every 20 ms) above its level before each operation.

    python benchmarks/checkpoint_io.py --layers 2 4 --vocab 32000 --work /tmp/ckio   # a JSON line per operation

Sizes scale with the parameter count (the optimizer state: 12 bytes per parameter in fp32 master + 2 moments, plus
the bf16 model); the README predicts the full 32-layer 8B from the per-layer slope of two depths.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
             "rope_theta": 500000.0, "tie_word_embeddings": False}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Host RSS peak above the level at entry, sampled in a thread."""

    def __enter__(self) -> "Peak":
        self.base, self.peak, self._stop = _rss(), 0, False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss())
        self.extra_gib = (self.peak - self.base) / 2**30


def _size_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**30


TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096}


def measure(layers: int, work: Path, tiny: bool = False, vocab: int = 128256, rows: list = None) -> list[dict]:
    from lightning.pytorch import Trainer

    from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy
    from lightning_ulysses.checkpoint.resharding import universal_tag
    from lightning_ulysses.data import SyntheticLMDataModule
    from lightning_ulysses.lightning.callbacks import HFExport

    rows = [] if rows is None else rows

    info: dict = {}

    def row(op: str, peak: Peak, **extra) -> None:
        r = {"layers": layers, "params_b": info.get("params_b"), "op": op, "seconds": round(peak.seconds, 1), "host_peak_extra_gib": round(peak.extra_gib, 2)}
        r.update(extra)
        rows.append(r)
        print(json.dumps(r), flush=True)

    def trainer(max_steps: int) -> Trainer:
        strategy = UlyssesDeepSpeedStrategy(sequence_parallel_size=1, stage=3)
        return Trainer(strategy=strategy, accelerator="cpu" if tiny else "gpu", devices=1,
                       precision="32-true" if tiny else "bf16-mixed", max_steps=max_steps,
                       logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)

    def module() -> CausalLMModule:
        return CausalLMModule(model=dict(TINY if tiny else dict(LLAMA3_8B, vocab_size=vocab), num_hidden_layers=layers),
                              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5, fused=not tiny))

    data = SyntheticLMDataModule(vocab_size=256 if tiny else vocab, seq_len=2048, num_train_samples=16, batch_size=1)
    ckpt = work / f"L{layers}.ckpt"
    t = trainer(2)
    m = module()
    t.fit(m, data)
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in m.model.parameters())
    info["params_b"] = round(params / 1e9, 3)
    with Peak() as p:
        t.save_checkpoint(ckpt)
    row("save (DeepSpeed shards + manifest + rename)", p, size_gib=round(_size_gib(ckpt), 2), gib_per_s=round(_size_gib(ckpt) / p.seconds, 2))
    export = HFExport(str(work / f"L{layers}_hf"))
    with Peak() as p:
        out = export.export(t, m, "final")
    row("HFExport (gather + save_pretrained, bf16)", p, size_gib=round(_size_gib(Path(out)), 2))
    shutil.rmtree(out)
    del t, m
    torch.cuda.empty_cache()
    t = trainer(3)
    m = module()
    strategy = t.strategy
    load = strategy.load_checkpoint
    timing: dict = {}

    def timed_load(path, weights_only=None):
        with Peak() as p:
            state = load(path, weights_only)
        timing["p"] = p
        return state

    strategy.load_checkpoint = timed_load
    t.fit(m, data, ckpt_path=str(ckpt))
    row("resume (load, same layout)", timing["p"], step_after=t.global_step)
    del t, m
    torch.cuda.empty_cache()
    with Peak() as p:
        universal_tag(str(ckpt))  # one process, as the strategy runs it
    row("universal conversion (resume at another world size; once)", p,
        size_gib=round(_size_gib(ckpt / "universal"), 2))
    shutil.rmtree(ckpt)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--work", default="/tmp/ckio")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (checks the script)")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary (smaller: the disk holds the conversion)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list = []
    try:
        for layers in args.layers:
            measure(layers, work, args.tiny, args.vocab, rows)
    finally:
        _table(rows, work)


def _table(rows: list, work: Path) -> None:
    print("\n| layers | params (B) | operation | s | host peak +GiB | size GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['params_b']} | {r['op']} | {r['seconds']} | {r['host_peak_extra_gib']} | {r.get('size_gib', '')} |")
    print(f"free disk after: {shutil.disk_usage(work).free / 2**30:.1f} GiB", os.uname().nodename)


if __name__ == "__main__":
    main()
