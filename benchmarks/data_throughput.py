"""Throughput of packed SFT and packed long-document rows vs one long synthetic document, through the CLI on one
GPU: ``configs/llama3_8b_long_context.yaml`` (the whole memory stack) with 4 layers of Llama-3.1-8B width (random
init), the data of ``data/`` repeated to length, ``seq_len`` tokens per row.

    python benchmarks/data_throughput.py OUT_DIR [--seq 131072] [--steps 4] [--only sft pretrain synthetic]
        [--attn flash_attention_2]

Prints, per run, the packing line and the SequenceThroughput summary (model TFLOPS count attention per packed
segment), then a table. By default the rows are built here with the package's own tokenizing and packing functions
(``lightning_ulysses.data.formats`` / ``.packing``, what the data modules run inside ``datasets.map``) and served by
:class:`PackedRowsDataModule`, so the machine needs no ``datasets``. With ``--datamodules`` the CLI runs the
package's own ``SFTDataModule`` / ``PretrainDataModule`` (``datasets`` needed) on the shipped files listed as many
times as the rows need.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 4,
         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 1048576}


class PackedRowsDataModule(LightningDataModule):
    """Serves rows saved by :func:`build_rows` (what a data module's ``setup`` would have built)."""

    def __init__(self, rows: str, batch_size: int = 1) -> None:
        super().__init__()
        self.rows, self.batch_size = rows, batch_size

    def train_dataloader(self) -> DataLoader:
        from lightning_ulysses.data.modules import RowsDataset, collate_rows

        saved = torch.load(self.rows)
        print(saved["describe"], flush=True)
        return DataLoader(RowsDataset(saved["rows"]), batch_size=self.batch_size, shuffle=True,
                          collate_fn=functools.partial(collate_rows, pad_id=saved["pad_id"]))


SOURCES = {"sft": ("conversations.jsonl", "messages"), "pretrain": ("documents.jsonl", "text")}


def tokenized_samples(kind: str) -> tuple[list, int]:
    """The shipped file of ``kind`` tokenized as the data modules do: ``([(ids, labels)], pad id)``."""
    from lightning_ulysses.data.formats import labels_from_mask, tokenize_sample
    from lightning_ulysses.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(ROOT / "data" / "tokenizer"))
    src, fmt = SOURCES[kind]
    samples = []
    for line in (ROOT / "data" / src).read_text().splitlines():
        ids, mask = tokenize_sample(json.loads(line), tok, fmt)
        samples.append((ids, labels_from_mask(ids, mask)))
    return samples, tok.pad_token_id


def copies_needed(kind: str, seq: int, rows: int) -> int:
    """How many times the shipped file must be repeated to fill ``rows`` rows of ``seq`` tokens."""
    samples, _ = tokenized_samples(kind)
    return 1 + rows * seq // sum(len(s[0]) for s in samples)


def datamodule_config(kind: str, seq: int, rows: int) -> dict:
    """The package's own data module over the shipped file repeated to length (``datasets`` tokenizes and packs)."""
    src, _ = SOURCES[kind]
    cls = {"sft": "SFTDataModule", "pretrain": "PretrainDataModule"}[kind]
    # 5% of every copy would be held out as validation; fit without validation here (limit_val_batches=0)
    return {"class_path": f"lightning_ulysses.data.{cls}",
            "init_args": {"data": [str(ROOT / "data" / src)] * copies_needed(kind, seq, rows),
                          "tokenizer": str(ROOT / "data" / "tokenizer"), "seq_len": seq, "packing": "best_fit",
                          "val_size": 0}}


def build_rows(kind: str, out: Path, seq: int, rows: int) -> str:
    from lightning_ulysses.data.packing import pack

    samples, pad_id = tokenized_samples(kind)
    packed, stats = pack(samples * copies_needed(kind, seq, rows), seq, pad_id, "best_fit", "split")
    describe = f"lightning_ulysses {kind}DataModule train: {stats.describe()} (packing='best_fit')"
    path = out / f"{kind}_rows.pt"
    torch.save({"rows": packed[:rows], "pad_id": pad_id, "describe": describe}, path)
    return str(path)


def run(name: str, data: dict, out: Path, seq: int, steps: int, attn: str = "sdpa") -> dict:
    config = yaml.safe_load((ROOT / "configs" / "llama3_8b_long_context.yaml").read_text())
    config["model"]["model"] = MODEL
    config["model"]["attn_implementation"] = attn
    if attn != "sdpa":  # the tiled attention backward replaces the sdpa kernel only
        config["trainer"]["strategy"]["init_args"]["tiled_attention_backward"] = False
    config["data"] = data
    config["trainer"].update(devices=1, max_steps=steps, default_root_dir=str(out / name), num_sanity_val_steps=0,
                             limit_val_batches=0)
    # no checkpoints: throughput only (each would hold the model's optimizer states: ~30 GB here, runs fill the disk)
    config["trainer"]["enable_checkpointing"] = False
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "ModelCheckpoint" not in c["class_path"]]
    config["trainer"]["callbacks"].append({"class_path": "lightning_ulysses.callbacks.SequenceThroughput"})
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = out / f"{name}.log"
    with open(log, "w") as f:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]))
        rc = subprocess.run([sys.executable, "-m", "lightning_ulysses", "fit", "--config", str(path)], cwd=ROOT,
                            stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    text = log.read_text()
    packing = re.findall(r"lightning_ulysses \w+DataModule train: .*", text)
    summary = re.findall(r"throughput \(median.*", text)
    print(f"{name}: rc={rc}\n  {packing[0] if packing else ''}\n  {summary[0] if summary else text[-3000:]}", flush=True)
    nums = {}
    if summary:
        m = re.search(r"([\d,]+) tokens/s, ([\d.]+) model TFLOPS/GPU.*peak ([\d.]+) GiB", summary[0])
        if m:
            nums = {"tokens_per_s": float(m.group(1).replace(",", "")), "model_tflops": float(m.group(2)),
                    "peak_gib": float(m.group(3))}
    eff = re.search(r"([\d.]+)% real tokens", packing[0]) if packing else None
    return {"name": name, "attn": attn, "rc": rc, "real_token_pct": float(eff.group(1)) if eff else None, **nums}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", nargs="*", default=["synthetic", "sft", "pretrain"])
    ap.add_argument("--attn", default="sdpa", help="the model's attn_implementation (e.g. flash_attention_2)")
    ap.add_argument("--datamodules", action="store_true",
                    help="sft/pretrain through the package's SFTDataModule/PretrainDataModule (needs `datasets`)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = args.steps + 2
    runs = {"synthetic": {"class_path": "lightning_ulysses.data.SyntheticLMDataModule",
                          "init_args": {"vocab_size": 128256, "seq_len": args.seq, "num_train_samples": 64}}}
    for kind in ("sft", "pretrain"):
        if kind in args.only:
            runs[kind] = (datamodule_config(kind, args.seq, rows) if args.datamodules else
                          {"class_path": "data_throughput.PackedRowsDataModule",
                           "init_args": {"rows": build_rows(kind, out, args.seq, rows)}})
    results = [run(name, runs[name], out, args.seq, args.steps, args.attn) for name in args.only]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("| run | attention | real tokens % | tokens/s | model TFLOPS (per segment) | peak GiB |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['attn']} | {r.get('real_token_pct')} | {r.get('tokens_per_s')} | {r.get('model_tflops')} | {r.get('peak_gib')} |")


if __name__ == "__main__":
    main()
