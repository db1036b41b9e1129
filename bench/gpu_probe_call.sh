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
#   gpu|-|<pytest -k expression>            tests/test_gpu.py on the lane's GPUs (skipped when under
#                                            TEST_MIN_LEFT_S seconds remain of DEADLINE_S)
# A pt line run twice in a lane is the compile-cache case: the store keeps its compile cache between runs.
# $OUT gets log.txt (everything), lane-*.txt, results/ (each run's JSON, plain file names) and logs.tgz.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-/tmp/gpu-probe-out}
WORK=${ANCHOR_WORK:-/tmp/anchors}
RES=$OUT/results LOGS=$WORK/logs STORE=${STORE:-/tmp/ptflow-bench-store}
SITE_LF=/tmp/site-lf SITE_CORE=/tmp/site-core DEADLINE_S=${DEADLINE_S:-560} TEST_MIN_LEFT_S=${TEST_MIN_LEFT_S:-90}
STEPS=${STEPS:-40} SKIP=${SKIP:-10} MB=${MB:-8} SEQ=${SEQ:-2048}
LANE_A=${LANE_A:-"lf|llama-1.1b|enable_liger_kernel=true
pt|llama-1.1b|layers+flash
pt|llama-1.1b|layers+flash+liger"}
LANE_B=${LANE_B:-"prof|llama-1.1b|layers
pt|llama-160m|compile+flex+liger
lf|llama-160m|torch_compile=true
prof|llama-1.1b|layers+liger"}
BOTH=${BOTH:-"pt|llama-1.1b|layers+flash+ddp"}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME=$WORK/hf_home HF_DATASETS_CACHE=$WORK/hf_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the device's rule
mkdir -p "$OUT" "$RES" "$LOGS"
exec > >(tee -a "$OUT/log.txt") 2>&1
SECONDS=0
say() { echo "=== [$(date +%T) +${SECONDS}s] $*"; }

say "setup"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
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
MODELS=$(printf '%s\n%s\n%s\n' "$LANE_A" "$LANE_B" "$BOTH" | awk -F'|' 'NF == 3 {print $2}' | sort -u | paste -sd, -)
env PYTHONPATH="$SITE_LF" CUDA_VISIBLE_DEVICES=0 timeout 150 python3 .anchors/lf_anchor.py preprocess \
  --model-dir "$WORK/models/llama-1.1b" --model-name llama-1.1b --dataset-dir "$WORK/data" \
  --tokenized-path "$WORK/tokenized_$SEQ" --output-dir "$WORK/lf_out/preprocess" --result "$RES/lf_preprocess.json" \
  --mb "$MB" --steps "$STEPS" --skip "$SKIP" --cutoff "$SEQ" --num-proc 16 > "$LOGS/lf-preprocess.log" 2>&1 &
P1=$!
env PYTHONPATH="$SITE_CORE:$REPO" timeout 150 python3 bench/train_bench.py --prepare-only --anchors-work "$WORK" \
  --models "$MODELS" --variants eager --seq "$SEQ" --store "$STORE" > "$LOGS/pt-prepare.log" 2>&1 \
  || tail -20 "$LOGS/pt-prepare.log"
wait $P1
say "setup done"

run_line() {  # run_line <gpus> <kind|model|arg>
  local devices=$1 kind model arg name
  IFS='|' read -r kind model arg <<< "$2"
  name="$kind-$model-$arg"
  local n=$(( $(tr -cd , <<< "$devices" | wc -c) + 1 )) start=$SECONDS rc
  say "start $name on GPU $devices"
  case $kind in
    lf) env PYTHONPATH="$SITE_LF" CUDA_VISIBLE_DEVICES="$devices" TORCHINDUCTOR_CACHE_DIR="/tmp/cache/$name" \
          timeout -k 10 240 python3 .anchors/lf_anchor.py train --model-dir "$WORK/models/$model" --model-name "$model" \
          --dataset-dir "$WORK/data" --tokenized-path "$WORK/tokenized_$SEQ" --output-dir "$WORK/lf_out/$name" \
          --result "$RES/run_$name.json" --tag "$name" --mb "$MB" --steps "$STEPS" --skip "$SKIP" --cutoff "$SEQ" \
          --num-proc 16 --lf-arg "$arg" > "$LOGS/$name.log" 2>&1; rc=$?; rm -rf "$WORK/lf_out/$name"
        mv "$RES/run_$name.json" "$RES/$(tr -c 'A-Za-z0-9._\n-' _ <<< "$name").json" 2>/dev/null ;;
    pt) env PYTHONPATH="$SITE_CORE:$REPO" CUDA_VISIBLE_DEVICES="$devices" TORCHINDUCTOR_CACHE_DIR="/tmp/cache/$name" \
          timeout -k 10 250 python3 bench/train_bench.py --anchors-work "$WORK" --models "$model" --variants "$arg" \
          --results "$RES" --store "$STORE-$devices" --mb "$MB" --seq "$SEQ" --steps "$STEPS" --skip "$SKIP" \
          --gpus "$n" --timeout 240 > "$LOGS/$name.log" 2>&1; rc=$?; rm -rf "$STORE-$devices/cache/train"  # 1.1b: 17 GB
        plain=$(tr -c 'A-Za-z0-9._\n-' _ <<< "$name-$start")  # the device tool returns plain file names only
        mv "$RES/run_ptflow-${arg}_${model}_mb$MB.json" "$RES/$plain.json" 2>/dev/null ;;
    gpu) if [ $((DEADLINE_S - SECONDS)) -lt "$TEST_MIN_LEFT_S" ]; then say "skip $name: too little time left"; return; fi
         env PYTHONPATH="$SITE_CORE:$REPO" CUDA_VISIBLE_DEVICES="$devices" timeout -k 5 $((DEADLINE_S - SECONDS - 10)) \
           python3 -m pytest -q -p no:cacheprovider -m "integration or not integration" tests/test_gpu.py -k "$arg" > "$LOGS/$name.log" 2>&1; rc=$?
         tail -15 "$LOGS/$name.log" ;;
    prof) env PYTHONPATH="$SITE_CORE:$REPO" CUDA_VISIBLE_DEVICES="$devices" TORCHINDUCTOR_CACHE_DIR="/tmp/cache/$name" \
          timeout -k 10 200 python3 bench/profile_train.py --model-dir "$WORK/models/$model" --variant "$arg" \
          --mb "$MB" --seq "$SEQ" > "$LOGS/$name.log" 2>&1; rc=$? ;;
  esac
  say "end $name rc=$rc in $((SECONDS - start))s"
  grep -hE "^ANCHOR_RESULT|^\| llama|tok/s|GPU busy|^  [a-z].* ms |first step|Error|ptflow.train train: (resum|first)" \
    "$LOGS/$name.log" | cut -c1-300 | head -30
}
lane() {  # lane <gpus> <lines>
  while IFS= read -r line; do [ -n "$line" ] && run_line "$1" "$line"; done <<< "$2"
}
# each lane's pt runs need their own store copy (a train entry per store): seed them from the prepared one
cp -r "$STORE" "$STORE-0"; cp -r "$STORE" "$STORE-1"; cp -r "$STORE" "$STORE-0,1"
lane 0 "$LANE_A" > "$OUT/lane-a.txt" 2>&1 &
P1=$!
lane 1 "$LANE_B" > "$OUT/lane-b.txt" 2>&1 &
P2=$!
wait $P1 $P2
cat "$OUT/lane-a.txt" "$OUT/lane-b.txt"
lane 0,1 "$BOTH"
say "done"
tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
