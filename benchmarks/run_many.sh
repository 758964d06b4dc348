#!/usr/bin/env bash
# Several alst_compare.py runs in a row, then one report.
#   benchmarks/run_many.sh OUTDIR NPROC "label|--path ours --seq 131072 ..." "label2|..." ...
# Each run's log goes to OUTDIR/label.log; a failed run is reported and the others go on.
# RUN_TIMEOUT=SECONDS kills a run that takes longer (a hung rank must not eat the next runs' time).
out=$1; nproc=$2; shift 2
mkdir -p "$out"
for spec in "$@"; do
  label=${spec%%|*}; args=${spec#*|}
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${RUN_TIMEOUT:-0}" torchrun --standalone --nproc_per_node="$nproc" benchmarks/alst_compare.py --label "$label" $args \
    --out "$out/$label.json" > "$out/$label.log" 2>&1 || echo "run $label failed (see $label.log)"
  echo "$label: $(( $(date +%s) - start )) s"
done
python3 benchmarks/alst_compare.py --report "$out"/*.json
