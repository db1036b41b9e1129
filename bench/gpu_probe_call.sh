#!/usr/bin/env bash
# One device call on a 2-GPU machine that looks for where ptflow's training time goes, using both GPUs
# as two lanes of single-GPU work (then one DDP run on both). Not the headline benchmark
# (bench/gpu_bench_call.sh is): lanes share the host's CPUs, so first-step times here are not comparable.
#
#   bash bench/gpu_probe_call.sh            # on the device, carrying .whl .whl-core .anchors
#
# Lane A (GPU 0): LANE_A plan lines; lane B (GPU 1): LANE_B; then BOTH on the two GPUs. A line is
#   pt|<model>|<train_bench variant>        ptflow's train stage (bench/train_bench.py)
#   lf|<model>|<LLaMA-Factory key=value>    the anchors' LLaMA-Factory run
#   prof|<model>|<profile_train variant>    bench/profile_train.py: kernel-family breakdown of a bare step
#   prep|-|<repeats>                       bench/prepare_bench.py --stage: the prepare stages vs LLaMA-Factory's
#                                            preprocessing, 16 workers each (FIRST: before the lanes, CPUs idle)
#   mk|<new model>|<base>:key=value,...    a model folder: the base's config and tokenizer, config keys changed
#   gpu|-|<pytest -k expression>            tests/test_gpu.py on the lane's GPUs (skipped when under
#                                            TEST_MIN_LEFT_S seconds remain of DEADLINE_S)
# A pt line run twice in a lane is the compile-cache case: the store keeps its compile cache between runs.
# A 4th field sets a line's options: MB= STEPS= SKIP= (sizes), NEED=<s> (skip the line unless that many seconds of
# DEADLINE_S are left), and for pt lines SAVE= KILL= KEEP= CUT= (below), SET=<train key>=<value>,... (train_bench
# --set), ENV=<VAR>=<value>,... (environment of the run, e.g. NCCL settings) and TMO=<s> (the run's time limit).
# Every pt line samples nvidia-smi and prints each GPU's highest memory use.
# $OUT gets log.txt (everything), lane-*.txt, results.jsonl (each run's JSON, appended as it ends) and logs.tgz.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-/tmp/gpu-probe-out}
WORK=${ANCHOR_WORK:-/tmp/anchors}
RES=$WORK/results LOGS=$WORK/logs
# the store (and so checkpoints) where there is most room: a ~10B model's sharded checkpoint is ~123 GB, about all
# of these machines' disk, while /dev/shm (RAM) may hold more; a kill -9 of the training processes leaves either
if [ -z "${STORE:-}" ]; then
  STORE=/tmp/ptflow-bench-store
  [ "$(df -B1G --output=avail /dev/shm 2>/dev/null | tail -1)" -gt "$(df -B1G --output=avail /tmp | tail -1)" ] 2>/dev/null \
    && STORE=/dev/shm/ptflow-bench-store
fi
SITE_LF=/tmp/site-lf SITE_CORE=/tmp/site-core DEADLINE_S=${DEADLINE_S:-560} TEST_MIN_LEFT_S=${TEST_MIN_LEFT_S:-90}
STEPS=${STEPS:-40} SKIP=${SKIP:-10} MB=${MB:-8} SEQ=${SEQ:-2048}
# The default plan is the 2026-11-27 final call (docs/benchmarks.md): headline ratios and first steps in the
# lanes, then DDP, an FSDP run killed (kill -9) after its checkpoint and resumed (its steady rate is the FSDP
# efficiency), and the largest model trained here with FSDP (~10.2B, cut after STEPS: its export alone would
# take minutes).
FIRST=${FIRST-"prep|-|2"}  # FIRST="" runs none
LANE_A=${LANE_A-"lf|llama-1.1b|enable_liger_kernel=true
pt|llama-1.1b|layers
pt|llama-1.1b|layers"}
LANE_B=${LANE_B-"lf|llama-160m|torch_compile=true
pt|llama-160m|compile+flex
pt|llama-160m|layers+flex"}
BOTH=${BOTH-"pt|llama-1.1b|layers+ddp
pt|llama-1.1b|layers+fsdp|SAVE=20 KILL=train:step-22 KEEP=1
pt|llama-1.1b|layers+fsdp|SAVE=20
mk|llama-10b|llama-1.1b:hidden_size=5120,num_hidden_layers=36,intermediate_size=13824,num_attention_heads=40,num_key_value_heads=8,head_dim=128
pt|llama-10b|layers+fsdp|MB=1 STEPS=30 CUT=1"}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME=$WORK/hf_home HF_DATASETS_CACHE=$WORK/hf_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the device's rule
mkdir -p "$OUT" "$RES" "$LOGS"
exec > >(tee -a "$OUT/log.txt") 2>&1
SECONDS=0
say() { echo "=== [$(date +%T) +${SECONDS}s] $*"; }

say "setup"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
df -h / /tmp /dev/shm 2>/dev/null; free -g | head -2; echo "store: $STORE"
# `wait` always names its pids: a bare `wait` also waits for the tee above, which never ends
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE_LF" .whl/*.whl > "$LOGS/install_lf.log" 2>&1 &
P1=$!
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE_CORE" .whl-core/*.whl .whl/liger_kernel-*.whl \
  > "$LOGS/install_core.log" 2>&1 &
P2=$!
[ -f "$WORK/corpus_stats.json" ] || python3 .anchors/build_assets.py --work "$WORK" --models llama-1.1b,llama-160m \
  > "$LOGS/assets.log" 2>&1 || tail -20 "$LOGS/assets.log"
wait $P1 $P2
say "sites and assets ready"
MADE=$(printf '%s\n' "$FIRST" "$LANE_A" "$LANE_B" "$BOTH" | awk -F'|' '$1 == "mk" {print $2}')  # made later
MODELS=$(printf '%s\n' "$LANE_A" "$LANE_B" "$BOTH" | awk -F'|' '$1 == "pt" {print $2}' | grep -vxF "${MADE:-none}" \
  | sort -u | paste -sd, -)
MODELS=${MODELS:-llama-1.1b}  # made models share its tokenizer, so its prepared data serves them
P1=""
if printf '%s\n' "$FIRST" "$LANE_A" "$LANE_B" "$BOTH" | grep -q '^lf|'; then  # LLaMA-Factory's tokenized data
  env PYTHONPATH="$SITE_LF" CUDA_VISIBLE_DEVICES=0 timeout 150 python3 .anchors/lf_anchor.py preprocess \
    --model-dir "$WORK/models/llama-1.1b" --model-name llama-1.1b --dataset-dir "$WORK/data" \
    --tokenized-path "$WORK/tokenized_$SEQ" --output-dir "$WORK/lf_out/preprocess" --result "$RES/lf_preprocess.json" \
    --mb "$MB" --steps "$STEPS" --skip "$SKIP" --cutoff "$SEQ" --num-proc 16 > "$LOGS/lf-preprocess.log" 2>&1 &
  P1=$!
fi
env PYTHONPATH="$SITE_CORE:$REPO" timeout 150 python3 bench/train_bench.py --prepare-only --anchors-work "$WORK" \
  --models "$MODELS" --variants eager --seq "$SEQ" --store "$STORE" > "$LOGS/pt-prepare.log" 2>&1 \
  || tail -20 "$LOGS/pt-prepare.log"
[ -z "$P1" ] || wait $P1
say "setup done"

run_line() {  # run_line <gpus> <kind|model|arg[|VAR=value ...]>
  local devices=$1 kind model arg opts name
  IFS='|' read -r kind model arg opts <<< "$2"
  name="$kind-$model-$arg"
  local n=$(( $(tr -cd , <<< "$devices" | wc -c) + 1 )) start=$SECONDS rc
  [ -n "$devices" ] || devices=0  # a CPU line (prep) still shows one GPU: LLaMA-Factory refuses none with bf16
  local MB=$MB STEPS=$STEPS SKIP=$SKIP SAVE="" KILL="" KEEP="" CUT="" SET="" ENV="" TMO=250 NEED=0  # a line's options
  [ -n "$opts" ] && local $opts
  if [ $((DEADLINE_S - SECONDS)) -lt "$NEED" ]; then say "skip $name: needs ${NEED}s, $((DEADLINE_S - SECONDS))s left"; return; fi
  say "start $name on GPU $devices ${opts:+($opts)}"
  case $kind in
    mk) python3 - "$WORK/models" "$model" "$arg" <<'PY'  # mk|<new model>|<base model>:key=value,...
import json, shutil, sys
from pathlib import Path
models, name, spec = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
base, _, edits = spec.partition(":")
shutil.rmtree(models / name, ignore_errors=True)
shutil.copytree(models / base, models / name, ignore=shutil.ignore_patterns("*.safetensors"))
config = json.loads((models / name / "config.json").read_text())
config.update({k: int(v) for k, v in (e.split("=") for e in edits.split(","))})
(models / name / "config.json").write_text(json.dumps(config, indent=2))
print(name, {k: config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                                     "num_key_value_heads", "vocab_size")})
PY
        rc=$? ;;
    lf) env PYTHONPATH="$SITE_LF" CUDA_VISIBLE_DEVICES="$devices" TORCHINDUCTOR_CACHE_DIR="/tmp/cache/$name" \
          timeout -k 10 240 python3 .anchors/lf_anchor.py train --model-dir "$WORK/models/$model" --model-name "$model" \
          --dataset-dir "$WORK/data" --tokenized-path "$WORK/tokenized_$SEQ" --output-dir "$WORK/lf_out/$name" \
          --result "$RES/run_$name.json" --tag "$name" --mb "$MB" --steps "$STEPS" --skip "$SKIP" --cutoff "$SEQ" \
          --num-proc 16 --lf-arg "$arg" > "$LOGS/$name@$start.log" 2>&1; rc=$?; rm -rf "$WORK/lf_out/$name"
        mv "$RES/run_$name.json" "$RES/$(tr -c 'A-Za-z0-9._\n-' _ <<< "$name").json" 2>/dev/null ;;
    pt) # SAVE=n: checkpoints every n steps; KILL=<fault point>: every rank SIGKILLs itself there (kill -9);
        # KEEP=1: keep the train entry/work folder for the next line (a resume); CUT=1: stop once the log has
        # step STEPS (skips the final export, for models whose export would eat the call) and keep its log
        local store="$STORE-$devices" plain
        plain=$(tr -c 'A-Za-z0-9._\n-' _ <<< "$name-$start")  # the device tool returns plain file names only
        # no TORCHINDUCTOR_CACHE_DIR: ptflow keeps its compile caches in the store (<store>/compile-cache), so a
        # lane's second run of a variant, or a resume, is the cache-hit case
        nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$LOGS/$name@$start.smi" 2>/dev/null &
        local smi=$!
        env PYTHONPATH="$SITE_CORE:$REPO" CUDA_VISIBLE_DEVICES="$devices" ${ENV:+$(tr , ' ' <<< "$ENV")} \
          ${KILL:+PTFLOW_KILL_AT=$KILL} setsid timeout -k 10 "$TMO" python3 bench/train_bench.py --anchors-work "$WORK" \
          --models "$model" --variants "$arg" --results "$RES" --store "$store" --mb "$MB" --seq "$SEQ" \
          --steps "$STEPS" --skip "$SKIP" --gpus "$n" --timeout $((TMO - 10)) ${SAVE:+--save-steps $SAVE} \
          ${SET:+--set $SET} > "$LOGS/$name@$start.log" 2>&1 &
        local pid=$!
        if [ -n "$CUT" ]; then
          until ! kill -0 $pid 2>/dev/null || [ $SECONDS -ge $DEADLINE_S ] || grep -qs "\"current_steps\": $STEPS," "$store"/cache/train/*.work/trainer_log.jsonl; do
            sleep 2; done
          kill -9 -- -$pid 2>/dev/null; sleep 2; pkill -9 -f "ptflow.train" 2>/dev/null; sleep 3  # torchrun: own group
          cp "$store"/cache/train/*.work/trainer_log.jsonl "$RES/$plain.trainer_log.jsonl" 2>/dev/null
          grep -h '"loss"' "$RES/$plain.trainer_log.jsonl" | cut -c1-600
        fi
        wait $pid; rc=$?
        kill $smi 2>/dev/null
        awk -F', ' '$2 > max[$1] {max[$1] = $2} END {for (g in max) printf "GPU %s peak memory used %.1f GiB (nvidia-smi)\n", g, max[g] / 1024}' \
          "$LOGS/$name@$start.smi"
        [ -n "$KEEP" ] || rm -rf "$store/cache/train"  # a 1.1b entry: 17 GB
        mv "$RES/run_ptflow-${arg}_${model}_mb$MB.json" "$RES/$plain.json" 2>/dev/null ;;
    prep) env PYTHONPATH="$SITE_CORE:$REPO" timeout -k 5 150 python3 bench/prepare_bench.py --stage --assets "$WORK" \
            --workers 16 --repeats "$arg" --lf-anchor .anchors/lf_anchor.py --lf-site "$SITE_LF" \
            --json "$OUT/prepare_stage.json" > "$LOGS/$name@$start.log" 2>&1; rc=$?
          tail -40 "$LOGS/$name@$start.log" ;;
    gpu) if [ $((DEADLINE_S - SECONDS)) -lt "$TEST_MIN_LEFT_S" ]; then say "skip $name: too little time left"; return; fi
         env PYTHONPATH="$SITE_CORE:$REPO" CUDA_VISIBLE_DEVICES="$devices" timeout -k 5 $((DEADLINE_S - SECONDS - 10)) \
           python3 -m pytest -q -p no:cacheprovider -m "integration or not integration" tests/test_gpu.py -k "$arg" \
           > "$LOGS/$name@$start.log" 2>&1; rc=$?
         tail -15 "$LOGS/$name@$start.log" ;;
    prof) env PYTHONPATH="$SITE_CORE:$REPO" CUDA_VISIBLE_DEVICES="$devices" TORCHINDUCTOR_CACHE_DIR="/tmp/cache/$name" \
          timeout -k 10 200 python3 bench/profile_train.py --model-dir "$WORK/models/$model" --variant "$arg" \
          --mb "$MB" --seq "$SEQ" > "$LOGS/$name@$start.log" 2>&1; rc=$? ;;
  esac
  say "end $name rc=$rc in $((SECONDS - start))s"
  # the device tool returns a handful of files: every run's JSON goes into one results.jsonl, as it ends
  for f in "$RES/$(tr -c 'A-Za-z0-9._\n-' _ <<< "$name")".json "$RES/$(tr -c 'A-Za-z0-9._\n-' _ <<< "$name-$start")".json; do
    [ -f "$f" ] && python3 -c "import json, sys; print(json.dumps({'run': sys.argv[2], **json.load(open(sys.argv[1]))}))" \
      "$f" "$name" >> "$OUT/results.jsonl"
  done
  [ "$rc" = 0 ] || grep -v "it/s\]\|s/it\]" "$LOGS/$name@$start.log" | tail -25 | cut -c1-300
  grep -hE "^ANCHOR_RESULT|^\| llama|tok/s|GPU busy|^  [a-z].* ms |first step|Error|ptflow.train train: (resum|first|[0-9,]+ param|checkpoint|model built)" \
    "$LOGS/$name@$start.log" | cut -c1-300 | head -30
}
lane() {  # lane <gpus> <lines>
  while IFS= read -r line; do [ -n "$line" ] && run_line "$1" "$line"; done <<< "$2"
}
# each lane's pt runs need their own store copy (a train entry per store): seed them from the prepared one
cp -r "$STORE" "$STORE-0"; cp -r "$STORE" "$STORE-1"; cp -r "$STORE" "$STORE-0,1"
lane "" "$FIRST"
lane 0 "$LANE_A" > "$OUT/lane-a.txt" 2>&1 &
P1=$!
lane 1 "$LANE_B" > "$OUT/lane-b.txt" 2>&1 &
P2=$!
wait $P1 $P2
cat "$OUT/lane-a.txt" "$OUT/lane-b.txt"
lane 0,1 "$BOTH"
say "done"
tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
