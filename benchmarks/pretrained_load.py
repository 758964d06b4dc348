"""A pretrained checkpoint through the CLI on one GPU: load time, host and GPU peak, full fine-tuning vs LoRA.

    python benchmarks/pretrained_load.py OUT_DIR [--layers 4] [--seq 131072] [--steps 3] [--lora-rank 16]

Saves an 8B-shaped Llama (random init, bf16, ``save_pretrained``, pad token set) with ``--layers`` decoder layers
to OUT_DIR/ckpt (nothing can be downloaded on the lent machines), then runs ``python -m lightning_ulysses fit``
with configs/llama3_8b_long_context.yaml (ZeRO-3, the memory stack) on it twice: full fine-tuning and LoRA on
every linear layer. Reports the time from start to the first training step (process start, imports, loading
into ZeRO-3 partitions, engine init), the SequenceThroughput summary, and the peak host RSS of the run.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import time
from pathlib import Path


def save_checkpoint(path: Path, layers: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (path / "config.json").exists():
        return 0.0
    t0 = time.perf_counter()
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=1048576, rope_theta=500000.0,
                      pad_token_id=128004, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    return time.perf_counter() - t0


def run(name: str, ckpt: Path, out: Path, seq: int, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lightning_ulysses", "fit", "--config", "configs/llama3_8b_long_context.yaml",
           f"--model.model={ckpt}", "--model.dtype=bfloat16", "--trainer.devices=1", f"--trainer.max_steps={steps}",
           f"--data.init_args.seq_len={seq}", "--trainer.callbacks+=lightning_ulysses.lightning.callbacks.SequenceThroughput",
           *extra]
    t0 = time.monotonic()
    first_step = None
    log = (out / f"{name}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    summary = ""
    for line in proc.stdout:  # type: ignore[union-attr]
        log.write(line)
        if first_step is None and re.match(r"step\s+1\s", line):
            first_step = time.monotonic() - t0
        if line.startswith("throughput"):
            summary = line.strip()
    proc.wait()
    log.close()
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB, max over finished children
    return {"name": name, "rc": proc.returncode, "to_first_step_s": first_step, "summary": summary, "host_peak_gib": rss}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--only", choices=["full", "lora"], default=None)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"ckpt_8b_width_{args.layers}l"
    saved = save_checkpoint(ckpt, args.layers)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
    print(f"checkpoint {ckpt.name}: {size:.2f} GiB on disk (saved in {saved:.0f} s)", flush=True)
    lora = f"--model.peft={{peft_type: LORA, r: {args.lora_rank}, lora_alpha: {2 * args.lora_rank}, target_modules: all-linear}}"
    runs = [("full", []), ("lora", [lora])]
    results = [run(n, ckpt, out, args.seq, args.steps, e) for n, e in runs if args.only in (None, n)]
    print("| run | rc | start to first step s | throughput summary | host peak GiB (max so far) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['rc']} | {r['to_first_step_s']} | {r['summary']} | {r['host_peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
