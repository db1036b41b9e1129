#!/usr/bin/env bash
# ptflow's production path on GPUs, in one device-machine call: a real `prefect server` (SQLite),
# `ptflow deploy` (cpu + gpu process pools, prefect.yaml's deployments), one process worker per pool,
# and pretrain/nightly runs placed on the gpu pool (orchestration.placement=gpu-pool).
#
#   bash bench/gpu_flow.sh [PHASE ...]        (from the repository root; default: flow)
#
# Phases (every call first installs .whl-ptflow/, starts the server, deploys and starts the workers):
#   flow      (a) first run, DDP on every GPU (train.num_processes unset)
#             (b) ~2% more text files: only the new shard is tokenized, the lineage continues
#             (c) train.fsdp: true (own lineage, from scratch)
#             (d) kill -9 the gpu flow run's process tree after its first checkpoint; the flow-level retry
#                 (PREFECT_FLOW_DEFAULT_RETRIES from prefect.yaml, delay shortened) resumes from the newest one
#   keybug    the cpu pool's worker sees no GPU (as on a real CPU-only pool) while num_processes is unset:
#             checks whether the parent and the gpu child agree on the train key (world_size is in the key)
#   overhead  the train stage inside the flow vs bench/train_bench.py alone, same work
#             (OV_MODEL llama-1.1b, OV_STEPS 200, micro-batch 8, sequence 2048, OV_VARIANT eager)
#   report    (run after the others automatically) bench/gpu_flow_report.py reads everything back
#             through Prefect's client: states, task-run names, artifacts, ptflow.* logs -> summary.json/md
#
# Results in $OUT (at most 7 files): summary.json, summary.md, nvidia-smi.txt, logs.tgz (server, deploy,
# worker and per-run Prefect logs, configs, trainer logs), overhead.json, overhead.md; console.log if the
# caller tees into it. Without a GPU (this repo's CI machine) every size drops to a CPU smoke size.
# Knobs: any variable below, e.g. STEPS_A=800 OV_STEPS=100 OV_GPUS=1 bash bench/gpu_flow.sh overhead
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
# The CLI moves from ptflow/cli.py to flows/cli.py; take whichever this checkout has.
if [ -z "${CLI:-}" ]; then if [ -f flows/cli.py ]; then CLI=flows.cli; else CLI=ptflow.cli; fi; fi
HELPER="$PY $ROOT/bench/gpu_flow_report.py"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the device's rule: keep set
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_API_URL=http://127.0.0.1:$PORT/api
export MPLBACKEND=Agg

say() { echo "[gpu_flow +$(( $(date +%s) - T0 ))s] $*"; }
die() { say "FATAL: $*"; exit 1; }

# ------------------------------------------------------------------ processes we start (setsid: own groups)
stop_pid() {  # stop the process group led by $1: TERM, then KILL
  local pid=$1 i
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}
stop_all() {
  local f
  [ -n "${SMI_PID:-}" ] && kill "$SMI_PID" 2>/dev/null
  for f in "$WORK"/pids/worker-* "$WORK"/pids/server; do [ -f "$f" ] && stop_pid "$(cat "$f")" && rm -f "$f"; done
}
finish() {
  local rc=$?
  stop_all
  collect
  say "done (exit $rc); results in $OUT: $(ls "$OUT" 2>/dev/null | tr '\n' ' ')"
}

tree_pids() {  # $1 and every descendant, from /proc (no ps needed)
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

# ------------------------------------------------------------------ setup
setup() {
  if [ -d "$WORK/pids" ]; then stop_all; fi  # leftovers of an earlier call on a warm machine
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
  NGPU=$($PY -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
  $PY - <<'EOF' 2>&1 | tee "$LOGS/versions.txt" || die "imports failed (wheels missing?)"
import importlib.metadata as md, sys, torch
names = ("prefect", "pydantic", "fastapi", "sqlalchemy", "torch", "transformers", "accelerate", "tokenizers",
         "huggingface-hub", "numpy", "pyarrow", "datasets", "liger-kernel")
v = {}
for n in names:
    try:
        v[n] = md.version(n)
    except md.PackageNotFoundError:
        v[n] = None
import prefect, pydantic, flows.pretrain, flows.train_stage  # noqa: F401  (the deployments' entrypoints import)
print(f"python {sys.version.split()[0]}; cuda devices {torch.cuda.device_count()}; {v}")
EOF
  if command -v nvidia-smi >/dev/null; then
    { date; nvidia-smi; nvidia-smi topo -m; } > "$OUT/nvidia-smi.txt" 2>&1
    nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used,power.draw --format=csv,noheader -l 1 \
      > "$LOGS/gpu-util.csv" 2>&1 &
    SMI_PID=$!
  fi
  say "GPUs: $NGPU; CLI: python -m $CLI; work: $WORK; phases: $PHASES"

  say "starting prefect server on 127.0.0.1:$PORT (SQLite in $WORK/server)"
  mkdir -p "$WORK/server"
  PREFECT_HOME=$WORK/server setsid $PY -m prefect server start --host 127.0.0.1 --port "$PORT" --no-ui \
    --no-scheduler --analytics-off > "$LOGS/server.log" 2>&1 < /dev/null &
  echo $! > "$WORK/pids/server"
  $PY - <<EOF || { tail -40 "$LOGS/server.log"; die "server did not answer /api/health"; }
import time, urllib.request
for i in range(180):
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
  tail -3 "$LOGS/deploy.log"
  start_worker cpu
  start_worker gpu
}

start_worker() {  # POOL [NAME=VALUE ...]: a process worker as users start it, with the store shared
  local pool=$1; shift
  mkdir -p "$WORK/home-$pool"
  env PREFECT_HOME="$WORK/home-$pool" PTFLOW_HOME="$STORE" PREFECT_WORKER_QUERY_SECONDS=1 "$@" \
    setsid $PY -m prefect worker start --pool "$pool" --name "gf-$pool" >> "$LOGS/worker-$pool.log" 2>&1 < /dev/null &
  echo $! > "$WORK/pids/worker-$pool"
  say "worker for pool $pool started (pid $!${*:+, $*})"
}
restart_worker() { local pool=$1; stop_pid "$(cat "$WORK/pids/worker-$pool")"; start_worker "$@"; }

# ------------------------------------------------------------------ sizes (GPU, or a CPU smoke size)
sizes() {
  if [ "$NGPU" -gt 0 ]; then
    : "${HIDDEN:=1024}" "${LAYERS:=10}" "${HEADS:=16}" "${KV_HEADS:=8}" "${INTER:=2816}" "${SEQ:=1024}" "${MB:=16}"
    : "${CORPUS_MB:=30}" "${N_SHARDS:=50}" "${VAL:=32}" "${BF16:=true}" "${LR:=6.0e-4}"
    : "${STEPS_A:=600}" "${STEPS_B:=200}" "${STEPS_C:=200}" "${STEPS_D:=400}" "${SAVE:=200}" "${SAVE_D:=100}"
    : "${STEPS_K:=60}" "${RUN_TIMEOUT:=300}"
    WORLD=$NGPU; FSDP_EXTRA=()
  else
    : "${HIDDEN:=64}" "${LAYERS:=2}" "${HEADS:=4}" "${KV_HEADS:=2}" "${INTER:=128}" "${SEQ:=128}" "${MB:=4}"
    : "${CORPUS_MB:=2}" "${N_SHARDS:=50}" "${VAL:=8}" "${BF16:=false}" "${LR:=1.0e-3}"
    : "${STEPS_A:=40}" "${STEPS_B:=20}" "${STEPS_C:=20}" "${STEPS_D:=60}" "${SAVE:=20}" "${SAVE_D:=10}"
    : "${STEPS_K:=20}" "${RUN_TIMEOUT:=600}"
    WORLD=1; FSDP_EXTRA=(-o train.num_processes=2)  # FSDP needs 2 ranks: gloo on the CPU
  fi
}

# ------------------------------------------------------------------ flow phase
flow_assets() {  # model folder (random-init llama from a config + the quickstart tokenizer), corpus, config
  say "assets: llama hidden $HIDDEN x $LAYERS layers, seq $SEQ, corpus ${CORPUS_MB} MB in $N_SHARDS shards (+1 held back)"
  HIDDEN=$HIDDEN LAYERS=$LAYERS HEADS=$HEADS KV_HEADS=$KV_HEADS INTER=$INTER SEQ=$SEQ CORPUS_MB=$CORPUS_MB \
  N_SHARDS=$N_SHARDS WORK=$WORK $PY - <<'EOF' || die "assets failed"
import json, os, sysconfig
from pathlib import Path
from transformers import LlamaConfig, PreTrainedTokenizerFast
e = os.environ
work = Path(e["WORK"])
model = work / "model"
tok = PreTrainedTokenizerFast(tokenizer_file="configs/quickstart/model/tokenizer.json", bos_token="<s>",
                              eos_token="</s>", pad_token="<pad>")
tok.save_pretrained(model)  # written by this machine's transformers
h = int(e["HIDDEN"])
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=int(e["INTER"]),
                  num_hidden_layers=int(e["LAYERS"]), num_attention_heads=int(e["HEADS"]),
                  num_key_value_heads=int(e["KV_HEADS"]), max_position_embeddings=int(e["SEQ"]),
                  tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, use_cache=False, rms_norm_eps=1e-5)
cfg.save_pretrained(model)
layer = 2 * h * h + 2 * h * (h * int(e["KV_HEADS"]) // int(e["HEADS"])) + 3 * h * int(e["INTER"])  # attn + mlp
print(f"model ~{(int(e['LAYERS']) * layer + 2 * len(tok) * h) / 1e6:.0f}M parameters, vocab {len(tok)}")
# Corpus: Python's own sources as {"text": ...} lines, N shards + 1 held back (~2%) for run (b).
root = Path(sysconfig.get_paths()["stdlib"])
texts = [p.read_text("utf-8", errors="replace") for p in sorted(root.rglob("*.py"))
         if "site-packages" not in p.parts and p.is_file()]
texts = [t for t in texts if t.strip()]
lines = [json.dumps({"text": t}) + "\n" for t in texts]
want, n = int(float(e["CORPUS_MB"]) * 2**20), int(e["N_SHARDS"])
out, size, i = [], 0, 0
while size < want * (n + 1) / n:
    out.append(lines[i % len(lines)]); size += len(out[-1]); i += 1
shards = work / "corpus" / "shards"
shards.mkdir(parents=True)
per = len(out) // (n + 1)
for k in range(n + 1):
    part = out[k * per:(k + 1) * per] if k < n else out[n * per:]
    (work / ("extra.jsonl" if k == n else f"corpus/shards/{k:03d}.jsonl")).write_text("".join(part))
(work / "corpus" / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "shards",
                                                                           "columns": {"prompt": "text"}}}))
print(f"corpus: {n} shards, {sum(f.stat().st_size for f in shards.iterdir()) / 2**20:.1f} MiB; "
      f"held back {(work / 'extra.jsonl').stat().st_size / 2**20:.2f} MiB")
EOF
  # A GPU-sized copy of configs/continual.yaml (same sections and orchestration).
  cat > "$WORK/gpu_continual.yaml" <<EOF
# GPU-sized configs/continual.yaml, written by bench/gpu_flow.sh
run_name: gpu-continual
seed: 42

model:
  model_name_or_path: $WORK/model
  train_from_scratch: true

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

# run_nightly LABEL EXPECT_JSON [trigger args ...]: trigger pretrain/nightly and wait; returns its exit code
run_nightly() {
  local label=$1 expect=$2; shift 2
  say "run ($label): pretrain/nightly $*"
  $HELPER trigger --runs "$WORK/runs.jsonl" --label "$label" --config "$WORK/gpu_continual.yaml" \
    --expect "$expect" --wait --timeout "$RUN_TIMEOUT" "$@" 2>&1 | tee -a "$LOGS/runs.log"
  local rc=${PIPESTATUS[0]}
  say "run ($label) finished (helper exit $rc)"
  return $rc
}

flow_phase() {
  flow_assets
  local no_retry=(--env PREFECT_FLOW_DEFAULT_RETRIES=0)  # a failure ends the run now instead of in 300 s
  # (a) first run: DDP on every GPU
  run_nightly a "{\"state\": \"COMPLETED\", \"parent_tasks\": [\"load_tokenizer [miss]\", \"prepare_dataset [miss]\"],
    \"children\": 1, \"child_task_regex\": \"train \\\\[miss\\\\]\", \"world_size\": $WORLD,
    \"lineage\": {\"run_name\": \"gpu-continual\", \"len\": 1},
    \"logs_regex\": [\"^ptflow\", \"tokenizing $N_SHARDS of $N_SHARDS shards\"]}" "${no_retry[@]}"
  # (b) ~2% more text files: only the new shard is tokenized; training continues from (a)'s model
  cp "$WORK/extra.jsonl" "$WORK/corpus/shards/$(printf %03d "$N_SHARDS").jsonl"
  run_nightly b "{\"state\": \"COMPLETED\", \"parent_tasks\": [\"load_tokenizer [hit]\", \"prepare_dataset [miss]\"],
    \"children\": 1, \"child_task_regex\": \"train \\\\[miss\\\\]\", \"world_size\": $WORLD,
    \"stages\": {\"load_tokenizer\": \"hit\", \"prepare_dataset\": \"miss\", \"train\": \"miss\"},
    \"lineage\": {\"run_name\": \"gpu-continual\", \"len\": 2},
    \"logs_regex\": [\"tokenizing 1 of $((N_SHARDS + 1)) shards\", \"continu|lineage\"]}" \
    -o "train.max_steps=$STEPS_B" "${no_retry[@]}"
  # (c) FSDP (own lineage, from scratch, on the same tokenized data)
  local fsdp_world=$WORLD; [ "$NGPU" -eq 0 ] && fsdp_world=2
  run_nightly c "{\"state\": \"COMPLETED\", \"parent_tasks\": [\"load_tokenizer [hit]\", \"prepare_dataset [hit]\"],
    \"children\": 1, \"child_task_regex\": \"train \\\\[miss\\\\]\", \"world_size\": $fsdp_world,
    \"speedups_regex\": \"FSDP over $fsdp_world processes\"}" \
    -o run_name=gpu-fsdp -o orchestration.continue_from=null -o train.fsdp=true -o "train.max_steps=$STEPS_C" \
    "${FSDP_EXTRA[@]}" "${no_retry[@]}"
  resume_run
}

resume_run() {  # (d) kill -9 the gpu flow run's process tree after its first checkpoint; the retry resumes
  local before id
  before=$(ls -d "$STORE"/cache/train/*.work/checkpoint-* 2>/dev/null | sort)
  say "run (d): pretrain/nightly, kill -9 after the first checkpoint, flow-level retry after 5 s"
  id=$($HELPER trigger --runs "$WORK/runs.jsonl" --label d --config "$WORK/gpu_continual.yaml" \
    -o run_name=gpu-resume -o orchestration.continue_from=null -o "train.max_steps=$STEPS_D" \
    -o "train.save_steps=$SAVE_D" \
    --env PREFECT_FLOW_DEFAULT_RETRIES=1 --env PREFECT_FLOW_DEFAULT_RETRY_DELAY_SECONDS=5 \
    --expect '{"state": "COMPLETED", "min_run_count": 2, "children": 2,
               "child_task_regex": "train \\[resume from step \\d+\\]",
               "stage_reason_regex": {"train": "resumed from checkpoint-\\d+"},
               "parent_tasks": ["load_tokenizer [hit]", "prepare_dataset [hit]"]}' | tail -1)
  [ -n "$id" ] || { say "run (d): trigger failed"; return 1; }
  local waited=0 ckpt=""
  while [ $waited -lt $((2 * RUN_TIMEOUT)) ]; do  # half-second polls
    ckpt=$(comm -13 <(echo "$before") <(ls -d "$STORE"/cache/train/*.work/checkpoint-* 2>/dev/null | sort) | head -1)
    [ -n "$ckpt" ] && break
    sleep 0.5; waited=$((waited + 1))
  done
  if [ -z "$ckpt" ]; then say "run (d): no checkpoint appeared"; $HELPER wait "$id" --timeout 60; return 1; fi
  say "run (d): $ckpt exists; killing the gpu worker's flow-run process tree"
  [ "$NGPU" -gt 0 ] && nvidia-smi > "$LOGS/nvidia-smi-before-kill.txt" 2>&1
  local worker victims
  worker=$(cat "$WORK/pids/worker-gpu")
  victims=$(tree_pids "$worker" | cut -d' ' -f2-)
  [ "$victims" = "$(tree_pids "$worker")" ] && victims=""
  { echo "gpu worker $worker; killing:"; for p in $victims; do
      echo "$p $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | cut -c1-200)"; done; } | tee "$LOGS/killed.txt"
  [ -n "$victims" ] && kill -9 $victims
  tail -2 "$STORE"/cache/train/*.work/trainer_log.jsonl 2>/dev/null | cut -c1-200 >> "$LOGS/killed.txt"
  $HELPER wait "$id" --timeout "$RUN_TIMEOUT" 2>&1 | tee -a "$LOGS/runs.log"
  local rc=${PIPESTATUS[0]}
  say "run (d) finished (helper exit $rc)"
  return $rc
}

keybug_phase() {  # the production layout: the cpu pool has no GPU; num_processes left unset
  [ -f "$WORK/gpu_continual.yaml" ] || flow_assets
  if [ "$NGPU" -lt 2 ]; then say "keybug: needs 2+ GPUs (the key's world_size differs only then); skipped"; return 0; fi
  restart_worker cpu CUDA_VISIBLE_DEVICES=
  run_nightly keybug "{\"state\": \"COMPLETED\", \"children\": 1, \"world_size\": $NGPU}" \
    -o run_name=gpu-keybug -o orchestration.continue_from=null -o "train.max_steps=$STEPS_K" \
    --env PREFECT_FLOW_DEFAULT_RETRIES=0
  restart_worker cpu
}

# ------------------------------------------------------------------ overhead phase
overhead_phase() {
  : "${OV_MODEL:=llama-1.1b}" "${OV_STEPS:=200}" "${OV_MB:=8}" "${OV_SEQ:=2048}" "${OV_VARIANT:=eager}"
  : "${OV_GPUS:=all}" "${OV_TIMEOUT:=560}"
  if [ "$NGPU" -eq 0 ]; then OV_MODEL=llama-tiny; OV_STEPS=30; OV_MB=4; OV_SEQ=256; fi
  local aw=$WORK/anchors
  if [ -f .anchors/build_assets.py ]; then  # the anchors' own assets (32K BPE tokenizer, stdlib corpus)
    say "overhead: assets from .anchors/build_assets.py ($OV_MODEL)"
    $PY .anchors/build_assets.py --work "$aw" --models "$OV_MODEL" --max-pos "$OV_SEQ" \
      $([ "$NGPU" -eq 0 ] && echo --max-files 300 --min-tokens 300000) > "$LOGS/overhead-assets.log" 2>&1 \
      || { tail -20 "$LOGS/overhead-assets.log"; die "anchors build_assets failed"; }
  else  # same layout, made here: the quickstart tokenizer (4096 tokens) and the stdlib corpus
    say "overhead: .anchors/ not carried; building the same layout with the quickstart tokenizer ($OV_MODEL)"
    OV_MODEL=$OV_MODEL OV_SEQ=$OV_SEQ AW=$aw NGPU=$NGPU $PY - <<'EOF' > "$LOGS/overhead-assets.log" 2>&1 \
      || { tail -20 "$LOGS/overhead-assets.log"; die "overhead assets failed"; }
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
  local compile=false scope=model pure=false sdpa=auto liger=false gpu_env=() np=()
  case "+$OV_VARIANT+" in *+compile+*) compile=true ;; esac
  case "+$OV_VARIANT+" in *+layers+*) compile=true; scope=layers ;; esac
  case "+$OV_VARIANT+" in *+pure+*) pure=true ;; esac
  case "+$OV_VARIANT+" in *+liger+*) liger=true ;; esac
  case "+$OV_VARIANT+" in *+cudnn+*) sdpa=cudnn ;; *+flash+*) sdpa=flash ;; esac
  if [ "$OV_GPUS" != all ]; then gpu_env=(env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((OV_GPUS - 1)))"); np=(-o "train.num_processes=$OV_GPUS"); fi
  # The flow's config: exactly bench/train_bench.py's train_section(variant) and its model/data sections.
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
  say "overhead: flow run of pretrain/nightly on $OV_MODEL, $OV_STEPS steps, mb $OV_MB x $OV_SEQ, $OV_VARIANT, GPUs $OV_GPUS"
  $HELPER trigger --runs "$WORK/overhead-runs.jsonl" --label ov --config "$WORK/overhead.yaml" "${np[@]}" \
    --env PREFECT_FLOW_DEFAULT_RETRIES=0 --wait --timeout "$OV_TIMEOUT" 2>&1 | tee -a "$LOGS/runs.log"
  say "overhead: bench/train_bench.py alone on the same work"
  local t1 t2 bf16_note=""
  [ "$NGPU" -eq 0 ] && bf16_note="(CPU: train_bench sets bf16=True; ptflow ignores it without CUDA)"
  t1=$(date +%s.%N)
  "${gpu_env[@]}" $PY bench/train_bench.py --anchors-work "$aw" --models "$OV_MODEL" --variants "$OV_VARIANT" \
    --steps "$OV_STEPS" --mb "$OV_MB" --seq "$OV_SEQ" --store "$WORK/bench-store" --results "$WORK/bench-results" \
    --timeout "$OV_TIMEOUT" 2>&1 | grep -vE "Warning|warn\(" | tee "$LOGS/train_bench.log"
  t2=$(date +%s.%N)
  say "overhead: train_bench.py took $($PY -c "print(round($t2 - $t1, 1))") s $bf16_note"
  $HELPER overhead --runs "$WORK/overhead-runs.jsonl" --label ov \
    --bench-json "$(ls "$WORK"/bench-results/run_*.json 2>/dev/null | head -1)" \
    --bench-wall "$($PY -c "print($t2-$t1)")" --mb "$OV_MB" --seq "$OV_SEQ" \
    --json "$OUT/overhead.json" --md "$OUT/overhead.md"
  cat "$WORK/overhead-runs.jsonl" >> "$WORK/runs.jsonl"
}

# ------------------------------------------------------------------ report and evidence
collect() {
  [ -d "$LOGS" ] || return 0
  if [ -n "${SMI_PID:-}" ] && [ -s "$LOGS/gpu-util.csv" ]; then
    { echo; echo "# per GPU during the phases: max utilization %, max memory MiB (nvidia-smi -l 1)";
      awk -F', ' '{u=$3+0; m=$4+0; if(u>U[$2])U[$2]=u; if(m>M[$2])M[$2]=m} END{for(g in U) print "GPU " g ": " U[g] "% " M[g] " MiB"}' \
        "$LOGS/gpu-util.csv"; } >> "$OUT/nvidia-smi.txt"
  fi
  cp "$WORK"/runs.jsonl "$LOGS/" 2>/dev/null
  for f in "$STORE"/cache/train/*/trainer_log.jsonl; do
    [ -f "$f" ] && cp "$f" "$LOGS/trainer_log-$(basename "$(dirname "$f")" | cut -c1-12).jsonl"
  done
  cp "$STORE"/lineage/*.jsonl "$LOGS/" 2>/dev/null
  tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
}

report_phase() {
  [ -s "$WORK/runs.jsonl" ] || { say "report: no runs recorded"; return 0; }
  $HELPER report --runs "$WORK/runs.jsonl" --json "$OUT/summary.json" --md "$OUT/summary.md" \
    --logs-dir "$LOGS" --store "$STORE"
  local rc=$?
  head -c 6000 "$OUT/summary.md"
  return $rc
}

setup
sizes
status=0
for phase in $PHASES; do
  case $phase in
    flow) flow_phase || status=1 ;;
    keybug) keybug_phase || status=1 ;;
    overhead) overhead_phase || status=1 ;;
    report) ;;
    all) flow_phase || status=1; keybug_phase || status=1; overhead_phase || status=1 ;;
    *) die "unknown phase $phase (flow, keybug, overhead, all)" ;;
  esac
done
report_phase || status=1
say "phases $PHASES: $([ $status -eq 0 ] && echo OK || echo 'SOME CHECKS FAILED')"
exit $status
