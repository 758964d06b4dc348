"""GPU check that SP=N trains like SP=1: same model, same samples, same order, bf16.

Each run goes through the real user path (``lightning.Trainer`` + ``UlyssesDeepSpeedStrategy``) and
writes per-step losses, the sample ids each step used, step times and peak memory as JSON:

    torchrun --nproc_per_node=1 benchmarks/sp_parity_gpu.py --sp 1 --out sp1.json
    torchrun --nproc_per_node=2 benchmarks/sp_parity_gpu.py --sp 2 --out sp2.json
    python benchmarks/sp_parity_gpu.py --compare sp1.json sp2.json

With one DP group in both runs, Lightning's DistributedSampler (num_replicas=1, seed 0) yields the
same sample order; the recorded ids prove it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, 4096), rope_theta=500000.0, tie_word_embeddings=False,
    )


def run(args) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_ulysses  # noqa: F401
    from lightning_ulysses import CausalLMModule, UlyssesDeepSpeedStrategy
    from lightning_ulysses.data.synthetic import MarkovTokens

    class Indexed(MarkovTokens):
        def __getitem__(self, idx):
            item = super().__getitem__(idx)
            item["idx"] = torch.tensor(idx)
            return item

    class Record(L.Callback):
        def __init__(self):
            self.rows, self.t0 = [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            self.rows.append({
                "step": batch_idx, "loss": float(outputs["loss"]), "idx": batch["idx"].tolist(),
                "local_seq": int(batch["input_ids"].shape[1]), "step_s": time.perf_counter() - self.t0,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            })

    data = Indexed(args.steps, args.seq_len, args.vocab, branching=8, seed=0)
    module = CausalLMModule(
        model=llama_config(args), attn_implementation="sdpa", seed=0, gradient_checkpointing=True,
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, fused=True),
    )
    rec = Record()
    trainer = L.Trainer(
        accelerator="gpu", devices=args.sp, precision="bf16-mixed", max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
        strategy=UlyssesDeepSpeedStrategy(sequence_parallel_size=args.sp, stage=args.stage),
    )
    trainer.fit(module, DataLoader(data, batch_size=1))
    if trainer.global_rank == 0:
        n_params = sum(p.numel() for p in module.model.parameters())
        if args.stage == 3:
            n_params = sum(getattr(p, "ds_numel", p.numel()) for p in module.model.parameters())
        with open(args.out, "w") as f:
            json.dump({"sp": args.sp, "seq_len": args.seq_len, "params": n_params, "rows": rec.rows,
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__}, f, indent=1)


def compare(paths) -> None:
    runs = [json.load(open(p)) for p in paths]
    base = runs[0]
    print(f"model params: {base['params'] / 1e6:.1f}M, seq_len {base['seq_len']}, device {base['device']}")
    header = "| step | sample | " + " | ".join(f"SP={r['sp']} loss" for r in runs) + " | max abs diff |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for k, row in enumerate(base["rows"]):
        losses = [r["rows"][k]["loss"] for r in runs]
        ids = {tuple(r["rows"][k]["idx"]) for r in runs}
        assert len(ids) == 1, f"runs used different samples at step {k}: {ids}"
        diff = max(abs(x - losses[0]) for x in losses)
        print(f"| {k} | {row['idx']} | " + " | ".join(f"{x:.4f}" for x in losses) + f" | {diff:.4f} |")
    for r in runs:
        steady = [x["step_s"] for x in r["rows"][1:]] or [r["rows"][0]["step_s"]]
        print(f"SP={r['sp']}: local seq {r['rows'][0]['local_seq']}, median step {sorted(steady)[len(steady) // 2]:.3f} s, "
              f"peak alloc {max(x['peak_gib'] for x in r['rows']):.2f} GiB (rank 0)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sp", type=int, default=2)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--out", default="sp.json")
    p.add_argument("--compare", nargs="+")
    args = p.parse_args()
    if args.compare:
        compare(args.compare)
    else:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        run(args)


if __name__ == "__main__":
    main()
