#!/usr/bin/env bash
# ptflow's production path on GPUs, in one device-machine call: a real `prefect server` (SQLite),
# `ptflow deploy` (cpu + gpu process pools, prefect.yaml's deployments), one process worker per pool,
# and pretrain/nightly runs placed on the gpu pool (orchestration.placement=gpu-pool).
#
#   bash bench/gpu_flow.sh [PHASE ...]        (from the repository root; default: flow)
#
# Every call installs .whl-ptflow/ into $SITE, starts the server, deploys, starts the workers, then:
#   flow      (a) first run: DDP on every GPU (train.num_processes unset)
#             (b) ~2% more text files: only the new shard is tokenized, the lineage continues from (a)
#             (c) train.fsdp=true (own lineage, from scratch, same tokenized data)
#             (d) kill -9 the gpu worker's flow-run process tree once the first checkpoint exists; the
#                 flow-level retry (PREFECT_FLOW_DEFAULT_RETRIES from prefect.yaml, delay cut to 5 s)
#                 resumes from the newest checkpoint
#   overhead  the train stage inside the flow vs bench/train_bench.py alone on the same work
#             (OV_MODEL=llama-1.1b OV_STEPS=200 OV_MB=8 OV_SEQ=2048 OV_VARIANT=eager OV_GPUS=all)
# Then bench/gpu_flow_report.py reads everything back through Prefect's client (states, task-run names,
# artifacts, ptflow.* log lines) and checks each run's expectations -> summary.json / summary.md.
#
# The cpu pool's worker sees no GPU (CUDA_VISIBLE_DEVICES=""), as on a real CPU-only pool; set
# CPU_POOL_SEES_GPUS=1 to give it the GPUs. Results in $OUT (at most 7 files): summary.json,
# summary.md, nvidia-smi.txt, logs.tgz (server, deploy and worker logs, Prefect logs per run, configs,
# trainer logs, lineage), overhead.json, overhead.md, and console.log if the caller tees into it.
# BUDGET_S (default 500 on GPUs) skips runs that would not finish in time, so the report is always written.
# Without a GPU every size drops to a CPU smoke size. Every size is a variable: STEPS_A=800 bash ...
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PHASES=${*:-flow}
T0=$(date +%s)
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl-ptflow}
SITE=${SITE:-/tmp/ptsite}
WORK=${WORK:-/tmp/gpuflow}
OUT=${OUT:-$WORK/out}
STORE=$WORK/store
LOGS=$WORK/logs
PORT=${PREFECT_PORT:-4200}
# The CLI moved from ptflow/cli.py to flows/cli.py; take whichever this checkout has.
if [ -z "${CLI:-}" ]; then if [ -f flows/cli.py ]; then CLI=flows.cli; else CLI=ptflow.cli; fi; fi
HELPER="$PY $ROOT/bench/gpu_flow_report.py"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the device's rule: keep set
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_API_URL=http://127.0.0.1:$PORT/api MPLBACKEND=Agg

elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[gpu_flow +$(elapsed)s] $*"; }
die() { say "FATAL: $*"; exit 1; }

# ------------------------------------------------------------------ processes (each started with setsid)
tree_pids() {  # $1 and every descendant, read from /proc (flow-run processes have sessions of their own)
  $PY - "$1" <<'EOF'
import os, sys
kids = {}
for d in os.listdir("/proc"):
    if d.isdigit():
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
todo, seen = [int(sys.argv[1])], []
while todo:
    p = todo.pop()
    seen.append(p)
    todo.extend(kids.get(p, []))
print(" ".join(map(str, seen)))
EOF
}
stop_all() {  # TERM every process we started and all their descendants, then KILL what is left after 10 s
  local f pids="" i p alive
  [ -n "${SMI_PID:-}" ] && kill "$SMI_PID" 2>/dev/null
  for f in "$WORK"/pids/worker-* "$WORK"/pids/server; do
    [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && pids="$pids $(tree_pids "$(cat "$f")")"
    rm -f "$f"
  done
  [ -n "${pids// /}" ] || return 0
  kill -TERM $pids 2>/dev/null
  for i in $(seq 1 20); do
    alive=0
    for p in $pids; do kill -0 "$p" 2>/dev/null && { alive=1; break; }; done
    [ $alive = 0 ] && return 0
    sleep 0.5
  done
  { kill -KILL $pids; wait; } 2>/dev/null
  return 0
}
finish() {
  local rc=$?
  stop_all
  collect
  say "done (exit $rc); $OUT: $(ls "$OUT" 2>/dev/null | tr '\n' ' ')"
}

# ------------------------------------------------------------------ setup
setup() {
  [ -d "$WORK/pids" ] && stop_all  # leftovers of an earlier call on a warm machine
  rm -rf "$WORK"
  mkdir -p "$WORK/pids" "$LOGS" "$OUT" "$STORE"
  trap finish EXIT
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    local stamp
    stamp=$(ls "$WHEELS" | md5sum | cut -c1-32)
    if [ "$(cat "$SITE/.stamp" 2>/dev/null)" != "$stamp" ]; then
      say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
      rm -rf "$SITE"
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl > "$LOGS/pip.log" 2>&1 || { cat "$LOGS/pip.log"; die "pip install of $WHEELS failed"; }
      echo "$stamp" > "$SITE/.stamp"
    fi
  fi
  export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}

  say "starting prefect server on 127.0.0.1:$PORT (SQLite in $WORK/server)"
  mkdir -p "$WORK/server"
  PREFECT_HOME=$WORK/server setsid $PY -m prefect server start --host 127.0.0.1 --port "$PORT" --no-ui \
    --no-scheduler --analytics-off > "$LOGS/server.log" 2>&1 < /dev/null &
  echo $! > "$WORK/pids/server"

  # While the server starts: versions, the GPU count, and that the deployments' entrypoints import.
  $PY - "$WORK/ngpu" <<'EOF' 2>&1 | tee "$LOGS/versions.txt" || die "imports failed (wheels missing?)"
import importlib.metadata as md, sys, torch
v = {}
for n in ("prefect", "pydantic", "fastapi", "sqlalchemy", "torch", "transformers", "accelerate", "tokenizers",
          "huggingface-hub", "numpy", "pyarrow", "datasets", "liger-kernel"):
    try:
        v[n] = md.version(n)
    except md.PackageNotFoundError:
        v[n] = None
import prefect, pydantic, flows.pretrain, flows.train_stage  # noqa: F401
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
open(sys.argv[1], "w").write(str(n))
print(f"python {sys.version.split()[0]}; cuda devices {n}; {v}")
# Does what is importable (machine's packages + carried wheels) satisfy prefect's requirement closure?
from packaging.requirements import Requirement
seen, todo, bad = set(), ["prefect", "pydantic"], []
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    for line in md.requires(name) or []:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            bad.append(f"{req} (missing)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            bad.append(f"{req} (have {have})")
        todo.append(req.name)
print(f"prefect's requirement closure: {len(seen)} packages, " + ("all satisfied" if not bad else "NOT satisfied: " + "; ".join(sorted(set(bad)))))
EOF
  NGPU=$(cat "$WORK/ngpu")
  if command -v nvidia-smi >/dev/null; then
    { date; nvidia-smi; nvidia-smi topo -m; } > "$OUT/nvidia-smi.txt" 2>&1
    nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used,power.draw --format=csv,noheader -l 1 \
      > "$LOGS/gpu-util.csv" 2>&1 &
    SMI_PID=$!
  fi
  sizes
  say "GPUs: $NGPU; CLI: python -m $CLI; work: $WORK; phases: $PHASES; budget ${BUDGET_S}s"
  case " $PHASES " in *" flow "*|*" all "*) flow_assets > "$LOGS/assets.log" 2>&1 & ASSETS_PID=$! ;; esac

  $PY - <<EOF || { tail -40 "$LOGS/server.log"; die "server did not answer /api/health"; }
import time, urllib.request
for i in range(240):
    try:
        if urllib.request.urlopen("$PREFECT_API_URL/health", timeout=2).status == 200:
            break
    except Exception:
        time.sleep(0.5)
else:
    raise SystemExit(1)
EOF
  say "server healthy; python -m $CLI deploy"
  mkdir -p "$WORK/home-deploy"
  PREFECT_HOME=$WORK/home-deploy $PY -m "$CLI" deploy > "$LOGS/deploy.log" 2>&1 \
    || { tail -60 "$LOGS/deploy.log"; die "deploy failed"; }
  grep -E "^ptflow|work pool" "$LOGS/deploy.log" | tail -4
  if [ "${CPU_POOL_SEES_GPUS:-0}" = 1 ]; then start_worker cpu; else start_worker cpu CUDA_VISIBLE_DEVICES=; fi
  sleep 2  # two workers registering at once can meet SQLite's lock
  start_worker gpu
  if [ -n "${ASSETS_PID:-}" ]; then
    wait "$ASSETS_PID" || { cat "$LOGS/assets.log"; die "assets failed"; }
    cat "$LOGS/assets.log"
  fi
}

start_worker() {  # POOL [NAME=VALUE ...]: a process worker as users start one, sharing the store
  local pool=$1; shift
  mkdir -p "$WORK/home-$pool"
  env PREFECT_HOME="$WORK/home-$pool" PTFLOW_HOME="$STORE" PREFECT_WORKER_QUERY_SECONDS=1 "$@" \
    setsid $PY -m prefect worker start --pool "$pool" --name "gf-$pool" >> "$LOGS/worker-$pool.log" 2>&1 < /dev/null &
  echo $! > "$WORK/pids/worker-$pool"
  say "worker for pool $pool started (pid $!${*:+; $*})"
}

# ------------------------------------------------------------------ sizes (GPU, or a CPU smoke size)
sizes() {
  if [ "$NGPU" -gt 0 ]; then
    : "${HIDDEN:=1024}" "${LAYERS:=10}" "${HEADS:=16}" "${KV_HEADS:=8}" "${INTER:=2816}" "${SEQ:=1024}" "${MB:=16}"
    : "${CORPUS_MB:=30}" "${N_SHARDS:=50}" "${VAL:=32}" "${BF16:=true}" "${LR:=6.0e-4}"
    : "${STEPS_A:=500}" "${STEPS_B:=120}" "${STEPS_C:=120}" "${STEPS_D:=300}" "${SAVE:=200}" "${SAVE_BC:=100}"
    : "${SAVE_D:=100}" "${RUN_TIMEOUT:=240}" "${BUDGET_S:=500}"
    WORLD=$NGPU; FSDP_WORLD=$NGPU; FSDP_EXTRA=()
  else
    : "${HIDDEN:=64}" "${LAYERS:=2}" "${HEADS:=4}" "${KV_HEADS:=2}" "${INTER:=128}" "${SEQ:=128}" "${MB:=4}"
    : "${CORPUS_MB:=2}" "${N_SHARDS:=50}" "${VAL:=8}" "${BF16:=false}" "${LR:=1.0e-3}"
    : "${STEPS_A:=40}" "${STEPS_B:=20}" "${STEPS_C:=20}" "${STEPS_D:=60}" "${SAVE:=20}" "${SAVE_BC:=10}"
    : "${SAVE_D:=10}" "${RUN_TIMEOUT:=900}" "${BUDGET_S:=7200}"
    WORLD=1; FSDP_WORLD=2; FSDP_EXTRA=(-o train.num_processes=2)  # FSDP needs 2 ranks: gloo on the CPU
  fi
}

left() { echo $(( BUDGET_S - $(elapsed) )); }
budget_ok() {  # LABEL SECONDS_NEEDED
  if [ "$(left)" -lt "$2" ]; then
    say "run ($1) skipped: $(left) s of the ${BUDGET_S} s budget left, needs ~$2 s"; SKIPPED="${SKIPPED:-}$1 "; return 1
  fi
}
wait_timeout() { local t; t=$(left); [ "$t" -gt "$RUN_TIMEOUT" ] && t=$RUN_TIMEOUT; [ "$t" -lt 30 ] && t=30; echo "$t"; }

# ------------------------------------------------------------------ flow phase
flow_assets() {  # model folder (random-init llama from a config + the quickstart tokenizer), corpus, config
  echo "assets: llama hidden $HIDDEN x $LAYERS layers, seq $SEQ, corpus ${CORPUS_MB} MB in $N_SHARDS shards (+1 held back)"
  HIDDEN=$HIDDEN LAYERS=$LAYERS HEADS=$HEADS KV_HEADS=$KV_HEADS INTER=$INTER SEQ=$SEQ CORPUS_MB=$CORPUS_MB \
  N_SHARDS=$N_SHARDS WORK=$WORK $PY - <<'EOF' || return 1
import json, os, sysconfig
from pathlib import Path
from transformers import LlamaConfig, PreTrainedTokenizerFast
e = os.environ
work = Path(e["WORK"])
model = work / "model"
tok = PreTrainedTokenizerFast(tokenizer_file="configs/quickstart/model/tokenizer.json", bos_token="<s>",
                              eos_token="</s>", pad_token="<pad>")
tok.save_pretrained(model)  # saved by this machine's transformers
h, heads, kv, inter, layers = (int(e[k]) for k in ("HIDDEN", "HEADS", "KV_HEADS", "INTER", "LAYERS"))
LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=int(e["SEQ"]),
            tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, use_cache=False, rms_norm_eps=1e-5).save_pretrained(model)
per_layer = 2 * h * h + 2 * h * (h * kv // heads) + 3 * h * inter  # attention + MLP
print(f"model: ~{(layers * per_layer + 2 * len(tok) * h) / 1e6:.0f}M parameters, vocab {len(tok)}")
# Corpus: Python's own sources as {"text": ...} lines; N shards + 1 held back (~2%) for run (b).
root = Path(sysconfig.get_paths()["stdlib"])
texts = [p.read_text("utf-8", errors="replace") for p in sorted(root.rglob("*.py"))
         if "site-packages" not in p.parts and p.is_file()]
lines = [json.dumps({"text": t}) + "\n" for t in texts if t.strip()]
want, n = int(float(e["CORPUS_MB"]) * 2**20), int(e["N_SHARDS"])
out, size, i = [], 0, 0
while size < want * (n + 1) / n:
    out.append(lines[i % len(lines)]); size += len(out[-1]); i += 1
(work / "corpus" / "shards").mkdir(parents=True)
per = len(out) // (n + 1)
for k in range(n + 1):
    part = out[k * per:(k + 1) * per] if k < n else out[n * per:]
    (work / ("extra.jsonl" if k == n else f"corpus/shards/{k:03d}.jsonl")).write_text("".join(part))
(work / "corpus" / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "shards",
                                                                           "columns": {"prompt": "text"}}}))
size = sum(f.stat().st_size for f in (work / "corpus" / "shards").iterdir())
print(f"corpus: {n} shards, {size / 2**20:.1f} MiB; held back {(work / 'extra.jsonl').stat().st_size / 2**20:.2f} MiB")
EOF
  # A GPU-sized copy of configs/continual.yaml (same sections and orchestration).
  cat > "$WORK/gpu_continual.yaml" <<EOF
# GPU-sized configs/continual.yaml, written by bench/gpu_flow.sh
run_name: gpu-continual
seed: 42

model:
  model_name_or_path: $WORK/model
  train_from_scratch: true          # first run only: later runs load the lineage's newest weights

data:
  dataset: corpus
  dataset_dir: $WORK/corpus
  cutoff_len: $SEQ
  val_size: $VAL

train:
  finetuning_type: full
  learning_rate: $LR
  lr_scheduler_type: cosine
  warmup_ratio: 0.05
  max_steps: $STEPS_A
  per_device_train_batch_size: $MB
  logging_steps: 10
  save_steps: $SAVE
  bf16: $BF16

eval:
  per_device_eval_batch_size: 16

output:
  license: apache-2.0

orchestration:
  continue_from: latest
  placement: local
EOF
  cp "$WORK/gpu_continual.yaml" "$LOGS/"
}

run_nightly() {  # LABEL EXPECT_JSON [trigger args ...]: run pretrain/nightly on the GPU config and wait
  local label=$1 expect=$2; shift 2
  say "run ($label): pretrain/nightly $*"
  $HELPER trigger --runs "$WORK/runs.jsonl" --label "$label" --config "$WORK/gpu_continual.yaml" \
    --expect "$expect" --wait --timeout "$(wait_timeout)" "$@" 2>&1 | tee -a "$LOGS/runs.log"
  local rc=${PIPESTATUS[0]}
  say "run ($label) finished (helper exit $rc)"
  return "$rc"
}

flow_phase() {
  local status=0 tps=$((MB * SEQ * WORLD)) no_retry=(--env PREFECT_FLOW_DEFAULT_RETRIES=0)
  # no_retry: a failed run ends now instead of retrying 300 s later (prefect.yaml's delay)
  if budget_ok a 100; then
    run_nightly a "{\"state\": \"COMPLETED\", \"parent_tasks\": [\"load_tokenizer [miss]\", \"prepare_dataset [miss]\"],
      \"children\": 1, \"child_task_regex\": \"train \\\\[miss\\\\]\", \"tokens_per_step\": $tps, \"world_size\": $WORLD,
      \"lineage\": {\"run_name\": \"gpu-continual\", \"index\": 0},
      \"logs_regex\": [\"^ptflow\\\\.\", \"tokenizing $N_SHARDS of $N_SHARDS shards\"]}" "${no_retry[@]}" || status=1
  fi
  # (b) ~2% more text files: only the new shard is tokenized; training continues from (a)'s model
  cp "$WORK/extra.jsonl" "$WORK/corpus/shards/$(printf %03d "$N_SHARDS").jsonl"
  if budget_ok b 60; then
    run_nightly b "{\"state\": \"COMPLETED\", \"parent_tasks\": [\"load_tokenizer [hit]\", \"prepare_dataset [miss]\"],
      \"children\": 1, \"child_task_regex\": \"train \\\\[miss\\\\]\", \"tokens_per_step\": $tps, \"world_size\": $WORLD,
      \"stages\": {\"load_tokenizer\": \"hit\", \"prepare_dataset\": \"miss\", \"train\": \"miss\"},
      \"lineage\": {\"run_name\": \"gpu-continual\", \"index\": 1},
      \"logs_regex\": [\"tokenizing 1 of $((N_SHARDS + 1)) shards\"]}" \
      -o "train.max_steps=$STEPS_B" -o "train.save_steps=$SAVE_BC" "${no_retry[@]}" || status=1
  fi
  # (c) FSDP (own lineage, from scratch, on the tokenized data of (b))
  if budget_ok c 60; then
    run_nightly c "{\"state\": \"COMPLETED\", \"parent_tasks\": [\"load_tokenizer [hit]\", \"prepare_dataset [hit]\"],
      \"children\": 1, \"child_task_regex\": \"train \\\\[miss\\\\]\", \"world_size\": $FSDP_WORLD,
      \"speedups_regex\": \"FSDP over $FSDP_WORLD processes\"}" \
      -o run_name=gpu-fsdp -o orchestration.continue_from=null -o train.fsdp=true -o "train.max_steps=$STEPS_C" \
      -o "train.save_steps=$SAVE_BC" "${FSDP_EXTRA[@]}" "${no_retry[@]}" || status=1
  fi
  if budget_ok d 90; then resume_run || status=1; fi
  return $status
}

resume_run() {  # (d) kill -9 the gpu flow run's process tree after its first checkpoint; the retry resumes
  local before id waited=0 ckpt="" worker victims
  before=$(ls -d "$STORE"/cache/train/*.work/checkpoint-* 2>/dev/null | sort)
  say "run (d): pretrain/nightly; kill -9 after the first checkpoint; flow-level retry after 5 s"
  id=$($HELPER trigger --runs "$WORK/runs.jsonl" --label d --config "$WORK/gpu_continual.yaml" \
    -o run_name=gpu-resume -o orchestration.continue_from=null -o "train.max_steps=$STEPS_D" \
    -o "train.save_steps=$SAVE_D" \
    --env PREFECT_FLOW_DEFAULT_RETRIES=1 --env PREFECT_FLOW_DEFAULT_RETRY_DELAY_SECONDS=5 \
    --expect '{"state": "COMPLETED", "min_run_count": 2, "children": 2,
               "child_task_regex": "train \\[resume from step \\d+\\]",
               "stage_reason_regex": {"train": "resumed from checkpoint-\\d+"},
               "parent_tasks": ["load_tokenizer [hit]", "prepare_dataset [hit]"]}' | tail -1)
  [ -n "$id" ] || { say "run (d): trigger failed"; return 1; }
  while [ $waited -lt $((2 * $(wait_timeout))) ]; do  # half-second polls
    ckpt=$(comm -13 <(echo "$before") <(ls -d "$STORE"/cache/train/*.work/checkpoint-* 2>/dev/null | sort) | head -1)
    [ -n "$ckpt" ] && break
    sleep 0.5; waited=$((waited + 1))
  done
  if [ -z "$ckpt" ]; then say "run (d): no checkpoint appeared"; $HELPER wait "$id" --timeout 30; return 1; fi
  say "run (d): $ckpt exists; kill -9 of the gpu worker's flow-run process tree"
  [ "$NGPU" -gt 0 ] && nvidia-smi > "$LOGS/nvidia-smi-before-kill.txt" 2>&1
  worker=$(cat "$WORK/pids/worker-gpu")
  victims=$(tree_pids "$worker")
  victims=${victims#"$worker"}
  { echo "gpu worker $worker; kill -9:"
    for p in $victims; do echo "  $p $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-160)"; done
    echo "newest trainer_log lines at the kill:"
    tail -qn1 "$STORE"/cache/train/*.work/trainer_log.jsonl 2>/dev/null | cut -c1-160; } > "$LOGS/killed.txt"
  [ -n "${victims// /}" ] && kill -9 $victims
  cat "$LOGS/killed.txt"
  $HELPER wait "$id" --timeout "$(wait_timeout)" 2>&1 | tee -a "$LOGS/runs.log"
  local rc=${PIPESTATUS[0]}
  say "run (d) finished (helper exit $rc)"
  return "$rc"
}

# ------------------------------------------------------------------ overhead phase
overhead_phase() {
  : "${OV_MODEL:=llama-1.1b}" "${OV_STEPS:=200}" "${OV_MB:=8}" "${OV_SEQ:=2048}" "${OV_VARIANT:=eager}"
  : "${OV_GPUS:=all}" "${OV_TIMEOUT:=300}"
  if [ "$NGPU" -eq 0 ]; then OV_MODEL=llama-tiny; OV_STEPS=30; OV_MB=4; OV_SEQ=256; fi
  local aw=$WORK/anchors
  if [ -f .anchors/build_assets.py ]; then  # the anchors' own assets (32K BPE tokenizer, stdlib corpus)
    say "overhead: assets from .anchors/build_assets.py ($OV_MODEL)"
    $PY .anchors/build_assets.py --work "$aw" --models "$OV_MODEL" --max-pos "$OV_SEQ" \
      $([ "$NGPU" -eq 0 ] && echo --max-files 300 --min-tokens 300000) > "$LOGS/overhead-assets.log" 2>&1 \
      || { tail -20 "$LOGS/overhead-assets.log"; return 1; }
  else  # the same layout made here, with the quickstart tokenizer (4096 tokens) and the stdlib corpus
    say "overhead: no .anchors/; building the same layout with the quickstart tokenizer ($OV_MODEL)"
    OV_MODEL=$OV_MODEL OV_SEQ=$OV_SEQ AW=$aw NGPU=$NGPU $PY - <<'EOF' > "$LOGS/overhead-assets.log" 2>&1 \
      || { tail -20 "$LOGS/overhead-assets.log"; return 1; }
import json, os, sysconfig
from pathlib import Path
from transformers import LlamaConfig, PreTrainedTokenizerFast
e = os.environ
aw, name = Path(e["AW"]), e["OV_MODEL"]
shapes = {"llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4),
          "llama-160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                             num_key_value_heads=12),
          "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2)}
tok = PreTrainedTokenizerFast(tokenizer_file="configs/quickstart/model/tokenizer.json", bos_token="<s>",
                              eos_token="</s>", pad_token="<pad>")
tok.save_pretrained(aw / "models" / name)
LlamaConfig(vocab_size=len(tok), max_position_embeddings=int(e["OV_SEQ"]), rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, use_cache=False, **shapes[name]).save_pretrained(aw / "models" / name)
root = Path(sysconfig.get_paths()["stdlib"])
texts = [p.read_text("utf-8", errors="replace") for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]
texts = [t for t in texts if t.strip()][: (None if int(e["NGPU"]) else 300)]
(aw / "data").mkdir(parents=True, exist_ok=True)
reps = 2 if int(e["NGPU"]) else 1
(aw / "data" / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for _ in range(reps) for t in texts))
(aw / "data" / "dataset_info.json").write_text(json.dumps({"stdlib_py": {"file_name": "corpus.jsonl",
                                                                           "columns": {"prompt": "text"}}}))
print("ok", name, len(texts) * reps, "documents")
EOF
  fi
  local compile=false scope=model pure=false sdpa=auto liger=false gpu_env=() np=() t1 t2
  case "+$OV_VARIANT+" in *+compile+*) compile=true ;; esac
  case "+$OV_VARIANT+" in *+layers+*) compile=true; scope=layers ;; esac
  case "+$OV_VARIANT+" in *+pure+*) pure=true ;; esac
  case "+$OV_VARIANT+" in *+liger+*) liger=true ;; esac
  case "+$OV_VARIANT+" in *+cudnn+*) sdpa=cudnn ;; *+flash+*) sdpa=flash ;; esac
  if [ "$OV_GPUS" != all ]; then
    gpu_env=(env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((OV_GPUS - 1)))"); np=(-o "train.num_processes=$OV_GPUS")
  fi
  # The flow's config is bench/train_bench.py's train_section(variant) and its model and data sections.
  cat > "$WORK/overhead.yaml" <<EOF
run_name: overhead
seed: 0
model:
  model_name_or_path: $aw/models/$OV_MODEL
  train_from_scratch: true
  attn_implementation: sdpa
data:
  dataset: stdlib_py
  dataset_dir: $aw/data
  cutoff_len: $OV_SEQ
train:
  finetuning_type: full
  learning_rate: 3.0e-4
  max_steps: $OV_STEPS
  per_device_train_batch_size: $OV_MB
  lr_scheduler_type: cosine
  warmup_steps: 10
  max_grad_norm: 1.0
  logging_steps: 10
  save_steps: 1000000000
  bf16: $([ "$NGPU" -gt 0 ] && echo true || echo false)
  pure_bf16: $pure
  torch_compile: $compile
  compile_scope: $scope
  enable_liger_kernel: $liger
  sdpa_backend: $sdpa
  resume_from_checkpoint: false
orchestration:
  placement: local
EOF
  cp "$WORK/overhead.yaml" "$LOGS/"
  say "overhead: pretrain/nightly on $OV_MODEL, $OV_STEPS steps, $OV_MB x $OV_SEQ, $OV_VARIANT, GPUs $OV_GPUS"
  $HELPER trigger --runs "$WORK/overhead-runs.jsonl" --label ov --config "$WORK/overhead.yaml" "${np[@]}" \
    --env PREFECT_FLOW_DEFAULT_RETRIES=0 --expect '{"state": "COMPLETED", "children": 1}' \
    --wait --timeout "$OV_TIMEOUT" 2>&1 | tee -a "$LOGS/runs.log"
  say "overhead: bench/train_bench.py alone on the same work"
  t1=$(date +%s.%N)
  "${gpu_env[@]}" $PY bench/train_bench.py --anchors-work "$aw" --models "$OV_MODEL" --variants "$OV_VARIANT" \
    --steps "$OV_STEPS" --mb "$OV_MB" --seq "$OV_SEQ" --store "$WORK/bench-store" --results "$WORK/bench-results" \
    --timeout "$OV_TIMEOUT" 2>&1 | grep -vE "Warning|warn\(" | tee "$LOGS/train_bench.log"
  t2=$(date +%s.%N)
  say "overhead: train_bench.py took $($PY -c "print(round($t2 - $t1, 1))") s"
  cat "$WORK/overhead-runs.jsonl" >> "$WORK/runs.jsonl"
  cp "$WORK"/bench-results/run_*.json "$LOGS/" 2>/dev/null
  $HELPER overhead --runs "$WORK/overhead-runs.jsonl" --label ov \
    --bench-json "$(ls "$WORK"/bench-results/run_*.json 2>/dev/null | head -1)" \
    --bench-wall "$($PY -c "print($t2 - $t1)")" --mb "$OV_MB" --seq "$OV_SEQ" \
    --json "$OUT/overhead.json" --md "$OUT/overhead.md"
}

# ------------------------------------------------------------------ report and evidence
report_phase() {
  [ -s "$WORK/runs.jsonl" ] || { say "report: no runs recorded"; return 0; }
  say "report: reading every run back through the Prefect API"
  $HELPER report --runs "$WORK/runs.jsonl" --json "$OUT/summary.json" --md "$OUT/summary.md" \
    --logs-dir "$LOGS" --store "$STORE"
  local rc=$?
  head -c 3000 "$OUT/summary.md"
  return $rc
}

collect() {  # everything else into logs.tgz
  [ -d "$LOGS" ] || return 0
  if [ -s "$LOGS/gpu-util.csv" ]; then
    { echo; echo "# max utilization % and memory MiB per GPU over the call (nvidia-smi -l 1, $LOGS/gpu-util.csv)"
      awk -F', ' '{u=$3+0; m=$4+0; if(u>U[$2])U[$2]=u; if(m>M[$2])M[$2]=m} END{for(g in U) print "GPU " g ": " U[g] "% " M[g] " MiB"}' \
        "$LOGS/gpu-util.csv"; } >> "$OUT/nvidia-smi.txt"
  fi
  cp "$WORK"/runs.jsonl "$LOGS/" 2>/dev/null
  local f
  for f in "$STORE"/cache/train/*/trainer_log.jsonl; do
    [ -f "$f" ] && cp "$f" "$LOGS/trainer_log-$(basename "$(dirname "$f")" | cut -c1-12).jsonl"
  done
  cp "$STORE"/lineage/*.jsonl "$LOGS/" 2>/dev/null
  tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
}

setup
status=0
for phase in $PHASES; do
  case $phase in
    flow) flow_phase || status=1 ;;
    overhead) overhead_phase || status=1 ;;
    all) flow_phase || status=1; overhead_phase || status=1 ;;
    report) ;;
    *) die "unknown phase $phase (flow, overhead, all)" ;;
  esac
done
report_phase || status=1
if [ -n "${SKIPPED:-}" ]; then
  status=1
  echo "Runs skipped for time (BUDGET_S=$BUDGET_S): $SKIPPED" | tee -a "$OUT/summary.md"
fi
say "phases $PHASES: $([ $status -eq 0 ] && echo 'all checks passed' || echo 'SOME CHECKS FAILED OR RUNS SKIPPED')"
exit $status
