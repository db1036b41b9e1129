#!/usr/bin/env bash
# One device call on a 2-GPU machine (nvidia-h100-x2 / nvidia-h200-x2), in about 9 minutes:
#   1. LLaMA-Factory 0.9.5's best setting on the anchors' work (one GPU): llama-1.1b with
#      enable_liger_kernel=true, llama-160m with torch_compile=true;
#   2. ptflow's train stage on the same work with the same numerics (bf16 autocast, fp32 master weights,
#      token-weighted loss): llama-1.1b regional compile, SDPA auto (layers; pinning flash cost 4%), llama-160m whole-model
#      compile + flex_attention (compile+flex); pure bf16 (stochastic-rounding AdamW) for 1.1b if time is left;
#   3. ptflow llama-1.1b on both GPUs: DDP (per-GPU tokens/s vs one GPU = efficiency) and FSDP2.
# Random-init Llama, bf16, sequence 2048, micro-batch 8, STEPS steps, steady tokens/s over steps SKIP+1..STEPS.
#
#   bash bench/gpu_bench_call.sh             # on the device (OUT is set there)
#   DRY_RUN=1 bash bench/gpu_bench_call.sh   # here: print the plan and every command, run nothing heavy
#
# Needs (carried): .whl/ (../shared/anchors/fetch_wheels.sh: LLaMA-Factory and its pins), .whl-core/ (pydantic,
# pydantic-core, annotated-types, typing-inspection, typing-extensions: what ptflow's core imports and the image
# lacks), .anchors/ (a copy of ../shared/anchors). LLaMA-Factory runs on /tmp/site-lf (its own transformers 5.6.0),
# ptflow on the image's torch/transformers/accelerate plus /tmp/site-core.
# Runs are taken in priority order; one is skipped when its estimate would end after DEADLINE_S (seconds since
# the start), and is stopped at DEADLINE_S + GRACE_S at the latest; a failed run is recorded and the next one runs.
# $OUT gets: log.txt, table.md, results.json, results.tgz (every run's JSON and log, LF args, env).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-/tmp/gpu-bench-out}
WORK=${ANCHOR_WORK:-/tmp/anchors}
RES=$WORK/results
LOGS=$WORK/logs
STORE=${STORE:-/tmp/ptflow-bench-store}
SITE_LF=/tmp/site-lf
SITE_CORE=/tmp/site-core
STEPS=${STEPS:-40}
SKIP=${SKIP:-10}
MB=${MB:-8}
SEQ=${SEQ:-2048}
NUM_PROC=${NUM_PROC:-16}
DEADLINE_S=${DEADLINE_S:-535}
GRACE_S=${GRACE_S:-15}
RUN_CAP_S=${RUN_CAP_S:-240}
# name | system (lf/pt) | model | LF argument or ptflow variant | GPUs | estimated seconds (40 steps) | inductor cache
DEFAULT_PLAN="
lf-liger|lf|llama-1.1b|enable_liger_kernel=true|1|62|lf-liger
lf-compile|lf|llama-160m|torch_compile=true|1|63|lf-compile
pt-layers|pt|llama-1.1b|layers|1|82|pt-1.1b
pt-compile+flex|pt|llama-160m|compile+flex|1|82|pt-160m
pt-ddp|pt|llama-1.1b|layers+ddp|2|95|pt-1.1b
pt-fsdp|pt|llama-1.1b|layers+fsdp|2|100|pt-1.1b
pt-pure|pt|llama-1.1b|layers+pure|1|70|pt-1.1b
"
PLAN=${PLAN:-$DEFAULT_PLAN}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME=$WORK/hf_home HF_DATASETS_CACHE=$WORK/hf_cache
# NVLink multicast stays off (KINDS.md); children inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT" "$RES" "$LOGS"
STATUS=$WORK/plan_status.jsonl
: > "$STATUS"
exec > >(tee -a "$OUT/log.txt") 2>&1
SECONDS=0

say() { echo "=== [$(date +%T) +${SECONDS}s] $*"; }
maybe() {  # run, or print in a dry run
  if [ "$DRY_RUN" = 1 ]; then echo "  DRY: $*"; else "$@"; fi
}
record() {  # record <name> <status> <rc> <wall_s> <est_s> <started_s> <detail>
  printf '{"name":"%s","status":"%s","rc":"%s","wall_s":%s,"est_s":%s,"started_s":%s,"detail":"%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" >> "$STATUS"
}
gpu_state() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,clocks.sm,temperature.gpu,power.draw,memory.used \
    --format=csv,noheader 2>/dev/null | sed 's/^/    gpu: /'
}
gpu_clear() {  # wait for the last run's processes to free the GPUs; end any left (our own runs' pids)
  [ "$DRY_RUN" = 1 ] && return
  command -v nvidia-smi >/dev/null || return
  local i pids
  for i in $(seq 1 20); do
    pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ')
    [ -z "$pids" ] && return
    sleep 1
  done
  say "GPU still held by pid(s) $pids after 20 s: ending them"
  for p in $pids; do kill -9 "$p" 2>/dev/null; done
  sleep 2
}

say "repo=$REPO work=$WORK out=$OUT steps=$STEPS skip=$SKIP mb=$MB seq=$SEQ deadline=${DEADLINE_S}s dry_run=$DRY_RUN"
if [ "$DRY_RUN" != 1 ]; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1 | head -9
fi

# --- setup: wheels (two sites, in the background) and the anchors' assets (the image's Python) ---
say "setup: wheels -> $SITE_LF, $SITE_CORE; assets -> $WORK"
if [ "$DRY_RUN" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE_LF" .whl/*.whl \
    > "$LOGS/install_lf.log" 2>&1 &
  PID_LF=$!
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE_CORE" .whl-core/*.whl \
    .whl/liger_kernel-*.whl > "$LOGS/install_core.log" 2>&1 &
  PID_CORE=$!
  [ -f "$WORK/corpus_stats.json" ] || python3 .anchors/build_assets.py --work "$WORK" --models llama-1.1b,llama-160m \
    > "$LOGS/assets.log" 2>&1 || { say "FATAL: assets"; tail -20 "$LOGS/assets.log"; }
  wait $PID_LF || { say "FATAL: LLaMA-Factory wheels"; tail -20 "$LOGS/install_lf.log"; }
  wait $PID_CORE || { say "FATAL: core wheels"; tail -20 "$LOGS/install_core.log"; }
  cp "$WORK/corpus_stats.json" "$RES/" 2>/dev/null
else
  echo "  DRY: pip install .whl/*.whl -> $SITE_LF & .whl-core/*.whl + liger -> $SITE_CORE; build_assets.py"
fi
say "setup done"

# --- LLaMA-Factory's packed dataset (once) alongside ptflow's tokenizer + dataset caches (CPU only) ---
say "prepare: LLaMA-Factory preprocess (saved with tokenized_path) || ptflow prepare_dataset (store $STORE)"
T0=$SECONDS
PLAN_MODELS=$(awk -F'|' 'NF > 2 {print $3}' <<< "$PLAN" | sort -u | paste -sd, -)
FIRST_MODEL=$(awk -F'|' 'NF > 2 {print $3; exit}' <<< "$PLAN")
maybe env PYTHONPATH="$SITE_LF" CUDA_VISIBLE_DEVICES=0 timeout 150 python3 .anchors/lf_anchor.py preprocess \
  --model-dir "$WORK/models/$FIRST_MODEL" --model-name "$FIRST_MODEL" --dataset-dir "$WORK/data" \
  --tokenized-path "$WORK/tokenized_$SEQ" --output-dir "$WORK/lf_out/preprocess" --result "$WORK/lf_preprocess.json" \
  --mb "$MB" --steps "$STEPS" --skip "$SKIP" --cutoff "$SEQ" --num-proc "$NUM_PROC" > "$LOGS/lf-preprocess.log" 2>&1 &
PID_PRE=$!
maybe env PYTHONPATH="$SITE_CORE:$REPO" CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/train_bench.py --prepare-only \
  --anchors-work "$WORK" --models "$PLAN_MODELS" --variants eager --seq "$SEQ" \
  --store "$STORE" > "$LOGS/pt-prepare.log" 2>&1
rc_pt=$?
wait $PID_PRE
rc_lf=$?
record prepare done "lf=$rc_lf,pt=$rc_pt" $((SECONDS - T0)) 0 "$T0" "concurrent; not a speed measurement"
[ $rc_lf -ne 0 ] && { say "LLaMA-Factory preprocess FAILED rc=$rc_lf"; tail -25 "$LOGS/lf-preprocess.log"; }
[ $rc_pt -ne 0 ] && { say "ptflow prepare FAILED rc=$rc_pt"; tail -25 "$LOGS/pt-prepare.log"; }
grep -h "^prepared" "$LOGS/pt-prepare.log" 2>/dev/null
say "prepare done in $((SECONDS - T0))s"

# --- the timed runs, in priority order ---
run_lf() {  # run_lf <name> <model> <arg> <timeout> <cache dir>
  local name=$1 m=$2 arg=$3 t=$4 cache=$5 tag="lf-${1#lf-}_${2}_mb$MB"
  maybe env PYTHONPATH="$SITE_LF" CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR="$cache/inductor" \
    TRITON_CACHE_DIR="$cache/triton" timeout -k 10 "$t" python3 .anchors/lf_anchor.py train \
    --model-dir "$WORK/models/$m" --model-name "$m" --dataset-dir "$WORK/data" --tokenized-path "$WORK/tokenized_$SEQ" \
    --output-dir "$WORK/lf_out/$m" --result "$RES/run_${tag}.json" --tag "$tag" --mb "$MB" --steps "$STEPS" \
    --skip "$SKIP" --cutoff "$SEQ" --num-proc "$NUM_PROC" --lf-arg "$arg"
  local rc=$?
  rm -rf "$WORK/lf_out/$m"  # the saved 1.1b model is 4.4 GB
  return $rc
}
run_pt() {  # run_pt <name> <model> <variant> <gpus> <timeout> <cache dir>
  local m=$2 v=$3 g=$4 t=$5 cache=$6 devices=0
  [ "$g" -gt 1 ] && devices=$(seq -s, 0 $((g - 1)))
  rm -f "$RES/run_ptflow-${v}_${m}_mb$MB.json"
  maybe env PYTHONPATH="$SITE_CORE:$REPO" CUDA_VISIBLE_DEVICES="$devices" TORCHINDUCTOR_CACHE_DIR="$cache/inductor" \
    TRITON_CACHE_DIR="$cache/triton" timeout -k 10 "$((t + 10))" python3 bench/train_bench.py --anchors-work "$WORK" \
    --models "$m" --variants "$v" --results "$RES" --store "$STORE" --mb "$MB" --seq "$SEQ" --steps "$STEPS" \
    --skip "$SKIP" --gpus "$g" --timeout "$t"
  local rc=$?
  # train_bench exits 0 when a variant fails (it prints FAILED): the result file is the truth
  [ $rc -eq 0 ] && [ "$DRY_RUN" != 1 ] && [ ! -f "$RES/run_ptflow-${v}_${m}_mb$MB.json" ] && rc=1
  rm -rf "$STORE/cache/train"  # each 1.1b run leaves a 4.4 GB model and a 13 GB checkpoint
  return $rc
}

declare -A CACHE_USED=()
while IFS='|' read -r name system model arg gpus est cache; do
  [ -z "$name" ] && continue
  left=$((DEADLINE_S - SECONDS))
  if [ "$est" -gt "$left" ]; then
    say "SKIP $name ($model, $arg): estimated ${est}s, ${left}s left before the ${DEADLINE_S}s deadline"
    record "$name" skipped "" 0 "$est" "$SECONDS" "$model $arg; estimate over the ${left}s left"
    continue
  fi
  gpu_clear
  t=$((DEADLINE_S + GRACE_S - SECONDS)); [ $t -gt $RUN_CAP_S ] && t=$RUN_CAP_S
  if [ -n "${CACHE_USED[$cache]:-}" ]; then cnote="compile cache shared with ${CACHE_USED[$cache]}"
  else cnote="compile cache cold"; CACHE_USED[$cache]=$name; fi
  say "start $name: $system $model $arg on $gpus GPU(s), est ${est}s, timeout ${t}s, $cnote"
  gpu_state
  start=$SECONDS
  if [ "$system" = lf ]; then
    run_lf "$name" "$model" "$arg" "$t" "/tmp/cache/$cache" > "$LOGS/$name.log" 2>&1
  else
    run_pt "$name" "$model" "$arg" "$gpus" "$t" "/tmp/cache/$cache" > "$LOGS/$name.log" 2>&1
  fi
  rc=$?
  wall=$((SECONDS - start))
  if [ $rc -eq 0 ]; then
    record "$name" ok 0 "$wall" "$est" "$start" "$model $arg; $cnote"
    say "end $name: ok in ${wall}s (est ${est}s)"
    grep -hE "^ANCHOR_RESULT|^=== ptflow-|train: first step done|Error|error:" "$LOGS/$name.log" | cut -c1-400 | tail -6
  else
    status=failed; [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
    record "$name" "$status" "$rc" "$wall" "$est" "$start" "$model $arg; $cnote; see logs/$name.log"
    say "FAILED $name rc=$rc ($status) after ${wall}s; log tail:"
    grep -v "it/s\]\|s/it\]" "$LOGS/$name.log" | tail -25 | cut -c1-300
  fi
done <<< "$PLAN"
gpu_state

# --- summary: table.md, results.json, results.tgz ---
say "summary"
if [ "$DRY_RUN" != 1 ]; then
  cp "$WORK/lf_preprocess.json" "$LOGS/" 2>/dev/null
fi
python3 bench/gpu_bench_report.py --results "$RES" --models-dir "$WORK/models" --status "$STATUS" \
  --summarize .anchors/summarize.py --steps "$STEPS" --skip "$SKIP" --deadline "$DEADLINE_S" \
  --out "$OUT/results.json" --table "$OUT/table.md" > "$LOGS/report.log" 2>&1 \
  || { say "report FAILED"; tail -20 "$LOGS/report.log"; }
tar -czf "$OUT/results.tgz" -C "$WORK" results logs plan_status.jsonl 2>/dev/null
say "done in ${SECONDS}s; \$OUT: $(ls "$OUT" | tr '\n' ' ')"
echo
cat "$OUT/table.md" 2>/dev/null
sleep 1  # let tee flush into $OUT/log.txt
