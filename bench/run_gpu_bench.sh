#!/usr/bin/env bash
# One device-machine session of the training benchmark: ptflow's train stage, then (optionally)
# the LLaMA-Factory and plain-PyTorch anchors on the same machine, results side by side.
#
#   bash bench/run_gpu_bench.sh ptflow          # ptflow variants (VARIANTS, MODELS)
#   bash bench/run_gpu_bench.sh anchors         # LLaMA-Factory default + raw compile (run_anchors.sh)
#   LF_ARGS=enable_liger_kernel=true LF_TAG=-liger MODELS=llama-1.1b bash bench/run_gpu_bench.sh lf
#
# Needs: .anchors/ (a copy of ../shared/anchors), .whl/ (its fetch_wheels.sh) for LLaMA-Factory,
# .whl-ptflow/ (pydantic + liger-kernel wheels for Python 3.12) for ptflow on the device image.
# Results: $OUT/results.tgz (every run_*.json), $OUT/log_*.txt, $OUT/table.md.
set -uo pipefail
PHASE=${1:-ptflow}
export ANCHOR_WORK=${ANCHOR_WORK:-/tmp/anchors} OUT=${OUT:-/tmp/bench-out} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
MODELS=${MODELS:-"llama-160m llama-1.1b"}
VARIANTS=${VARIANTS:-"eager,compile,compile+liger"}
mkdir -p "$OUT" "$ANCHOR_WORK/results"
if [ ! -f /tmp/ptsite/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ptsite .whl-ptflow/*.whl && touch /tmp/ptsite/.ok
fi
[ -f "$ANCHOR_WORK/corpus_stats.json" ] || python3 .anchors/build_assets.py --work "$ANCHOR_WORK" \
  --models "$(echo $MODELS | tr ' ' ',')" > "$OUT/log_assets.txt" 2>&1
case "$PHASE" in
  ptflow)
    PYTHONPATH=/tmp/ptsite python3 bench/train_bench.py --anchors-work "$ANCHOR_WORK" \
      --models "$(echo $MODELS | tr ' ' ',')" --variants "$VARIANTS" --timeout ${RUN_TIMEOUT_S:-300} 2>&1 \
      | grep -vE "Warning|warn\(" | tee "$OUT/log_ptflow.txt" ;;
  anchors) MODELS="$MODELS" bash .anchors/run_anchors.sh lf; MODELS="$MODELS" RAW_EXTRA_MB="" bash .anchors/run_anchors.sh raw ;;
  lf) MODELS="$MODELS" bash .anchors/run_anchors.sh lf ;;
  raw) MODELS="$MODELS" RAW_EXTRA_MB="" bash .anchors/run_anchors.sh raw ;;
esac
python3 .anchors/summarize.py "$ANCHOR_WORK/results" --models-dir "$ANCHOR_WORK/models" --out "$OUT/results.json" \
  --table "$OUT/table.md" > /dev/null 2>&1 || true
tar -czf "$OUT/results.tgz" -C "$ANCHOR_WORK" results
cat "$OUT/table.md" 2>/dev/null | tail -30
