#!/usr/bin/env bash
# Throughput and peak memory of configs/llama3_8b_long_context.yaml through the CLI on one GPU, with 4 layers of
# Llama-3.1-8B width (random init) -- the "before/after" measurement of changes that touch the hot path. LAYERS=N (env)
# changes the depth.
#   benchmarks/cli_throughput.sh OUT_DIR SEQ_LEN [TREE [TAG [CLI_ARG...]]]
# TREE: a copy of another commit's package and configs (default .); TAG names the log; further arguments go to the
# CLI (e.g. --trainer.strategy.init_args.checkpoint_policy=save_attention).
# Prints the SequenceThroughput summary line and the process's peak resident host memory; the full log goes to OUT_DIR.
# STOP_AFTER_SUMMARY=1 (env) ends the process once that line is written (skips the teardown: freeing ~100 GiB of
# pinned host memory takes tens of seconds), for a step that must fit one time-limited command.
set -euo pipefail
out=$1; seq=$2; tree=${3:-.}; tag=${4:-}; shift $(( $# < 4 ? $# : 4 ))
mkdir -p "$out"; out=$(cd "$out" && pwd); tree=$(cd "$tree" && pwd)
override="$out/override_8b_4layers.yaml"
# no ModelCheckpoint: the shipped config's checkpoint at the end of a run is ~30 GB (it filled a 64 GiB disk); no
# validation: the sanity check's two forwards at full length cost as much as most of a step (200 s at 32 layers x 408K)
cat > "$override" <<YAML
trainer:
  enable_checkpointing: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
  callbacks: [{class_path: lightning_ulysses.lightning.callbacks.PrintLoss, init_args: {every_n_steps: 1}}]
model:
  model: {model_type: llama, hidden_size: 4096, intermediate_size: 14336, num_hidden_layers: ${LAYERS:-4},
          num_attention_heads: 32, num_key_value_heads: 8, vocab_size: 128256, max_position_embeddings: 1048576}
YAML
name=$(basename "$tree")${tag:+_$tag}_L${LAYERS:-4}
# run from inside the tree: `python -m` puts the working directory first on sys.path. The callback's module path is
# the pre-subpackage one, which later trees keep as an alias, so one command measures old and new trees.
cd "$tree"
PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" python -m lightning_ulysses fit \
  --config configs/llama3_8b_long_context.yaml --config "$override" \
  --trainer.devices=1 --trainer.max_steps=4 --data.init_args.seq_len="$seq" \
  --trainer.callbacks+=lightning_ulysses.callbacks.SequenceThroughput "$@" > "$out/${name}_$seq.log" 2>&1 &
pid=$!
# the process's peak resident memory (offloaded layer inputs sit in pinned host memory, which is resident)
peak_kib=0
stopped=0
while kill -0 "$pid" 2>/dev/null; do
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
  if [ -n "$rss" ] && [ "$rss" -gt "$peak_kib" ]; then peak_kib=$rss; fi
  if [ -n "${STOP_AFTER_SUMMARY:-}" ] && grep -q 'throughput (median' "$out/${name}_$seq.log"; then
    stopped=1; kill "$pid"; break
  fi
  sleep 0.5
done
wait "$pid" || [ "$stopped" = 1 ] || { tail -40 "$out/${name}_$seq.log"; exit 1; }
host=$(awk -v k="$peak_kib" 'BEGIN {printf "%.1f", k / 1048576}')
echo "$name $seq: $(grep 'throughput (median' "$out/${name}_$seq.log"), host peak $host GiB"
