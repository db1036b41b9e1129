"""A store on a real S3 API (moto's standalone server on 127.0.0.1) shared by "machines" that each have their
own local cache directory (PTFLOW_CACHE_DIR).

CPU stages on one machine and the train stage on another hand artifacts over through the bucket;
a re-run on a fresh machine hits every stage from the bucket; a kill -9 between an entry's files
and its manifest leaves no visible entry; a train stage killed mid-run resumes on a fresh machine
from the newest checkpoint it had uploaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import fsspec
import pytest
from conftest import ROOT, free_port

from ptflow.store.entries import lookup
from ptflow.store.layout import MANIFEST, Layout

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
BUCKET = "ptflow-it"
SECRET = "dummy-secret-5e1f"  # moto accepts any credentials; this one must never show up in what ptflow writes
ASSETS = [f"model.model_name_or_path={ROOT / 'configs/quickstart/model'}",
          f"data.dataset_dir={ROOT / 'configs/quickstart/data'}"]
FAST = [*ASSETS, "train.max_steps=8", "train.save_steps=3", "train.eval_steps=4", "train.logging_steps=2",
        "data.cutoff_len=128", "data.val_size=8", "run_name=objstore"]
STAGES = ["load_tokenizer", "prepare_dataset", "train", "evaluate", "plot_loss", "write_model_card"]

# The stages as plain functions, in a process of their own (so it can be killed): prints the artifacts' keys.
SCRIPT = """
import json, sys
from ptflow.config.loading import load_config
from ptflow.data.dataset import prepare_dataset
from ptflow.data.tokenizer import load_tokenizer
from ptflow.store.layout import Layout
from ptflow.train.loop import train
cfg = load_config(sys.argv[1], sys.argv[3:])
layout = Layout.resolve(cfg.store)
out = {"load_tokenizer": load_tokenizer(cfg.model, layout)}
if sys.argv[2] != "load_tokenizer":
    out["prepare_dataset"] = prepare_dataset(cfg.data, out["load_tokenizer"], layout, seed=cfg.seed)
if sys.argv[2] == "train":
    out["train"] = train(cfg.model, cfg.train, out["load_tokenizer"], out["prepare_dataset"], layout, seed=cfg.seed)
print(json.dumps({k: {"key": a.key, "hit": a.hit, "stats": a.stats} for k, a in out.items()}))
"""


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port, with dummy credentials and its endpoint in the environment; stopped after."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "AKIAPTFLOWTEST", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def store_url(s3) -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"


def on_machine(monkeypatch, cache: Path) -> None:
    monkeypatch.setenv("PTFLOW_CACHE_DIR", str(cache))


def remote_names(s3, url: str) -> set[str]:
    prefix = url.removeprefix("s3://")
    s3.invalidate_cache()
    return {name[len(prefix) + 1:] for name in s3.find(prefix)}


def run_script(url: str, cache: Path, upto: str, *extra: str, kill_at: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTFLOW_")}
    env.update(PTFLOW_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", **({"PTFLOW_KILL_AT": kill_at} if kill_at else {}))
    return subprocess.run([sys.executable, "-c", SCRIPT, str(QUICKSTART), upto, f"store={url}", *FAST, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_cpu_and_gpu_machines_share_the_bucket_and_a_fresh_machine_hits_everything(prefect_api, s3, store_url,
                                                                                   tmp_path, monkeypatch):
    from flows.pretrain import pretrain
    from flows.train_stage import train_stage

    cpu = run_script(store_url, tmp_path / "cpu", "prepare_dataset")  # the cpu pool's machine: data stages
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    keys = json.loads(cpu.stdout.strip().splitlines()[-1])
    overrides = [f"store={store_url}", *FAST]
    on_machine(monkeypatch, tmp_path / "gpu")  # the gpu pool's machine: only the train-stage flow
    trained = train_stage(str(QUICKSTART), keys["load_tokenizer"]["key"], keys["prepare_dataset"]["key"],
                          overrides)
    assert not trained["hit"]
    assert not (tmp_path / "cpu" / "cache" / "train").exists()
    assert Path(trained["path"]).parent == tmp_path / "gpu" / "cache" / "train"
    names = remote_names(s3, store_url)
    assert f"cache/train/{trained['key']}/{MANIFEST}" in names
    assert not any(".work/" in n for n in names)  # the finished entry replaces the uploaded checkpoints

    on_machine(monkeypatch, tmp_path / "flow")  # the whole flow elsewhere: every input comes from the bucket
    first = pretrain(config_path=str(QUICKSTART), overrides=overrides)
    rows = {row["stage"]: row["cache"] for row in first["stages"]}
    assert rows == {**{s: "hit" for s in STAGES[:4]}, "plot_loss": "miss", "write_model_card": "miss"}

    on_machine(monkeypatch, tmp_path / "fresh")  # a re-run on an empty cache: all hits from the bucket
    again = pretrain(config_path=str(QUICKSTART), overrides=overrides)
    assert {row["stage"]: row["cache"] for row in again["stages"]} == {s: "hit" for s in STAGES}
    out = Path(again["output_dir"])
    assert out == tmp_path / "fresh" / "runs" / "objstore"  # runs/ stays on the machine that ran the flow
    assert {"model.safetensors", "eval_results.json", "training_loss.png", "README.md"} <= {p.name for p in out.iterdir()}
    assert again["eval_loss"] == pytest.approx(first["eval_loss"])
    assert not any(n.startswith("runs/") for n in remote_names(s3, store_url))
    written = [p for cache in ("cpu", "gpu", "flow", "fresh") for p in (tmp_path / cache).rglob("*.json*")]
    for path in [*written, out / "README.md"]:  # manifests, lineage, logs, the card: no credentials
        assert SECRET not in path.read_text(errors="ignore") and "AKIAPTFLOWTEST" not in path.read_text(errors="ignore")


def test_kill_9_between_files_and_manifest_leaves_no_visible_entry(s3, store_url, tmp_path):
    killed = run_script(store_url, tmp_path / "a", "load_tokenizer", kill_at="load_tokenizer:uploading")
    assert killed.returncode == -9, killed.stderr[-3000:]
    names = remote_names(s3, store_url)
    uploaded = {n.split("/")[2] for n in names if n.startswith("cache/load_tokenizer/")}
    assert len(uploaded) == 1 and not any(n.endswith(MANIFEST) for n in names)  # files, but no manifest
    key = uploaded.pop()
    os.environ["PTFLOW_CACHE_DIR"] = str(tmp_path / "b")
    try:
        assert lookup(Layout.resolve(store_url), "load_tokenizer", key) == (None, "")  # absent, not damaged
    finally:
        del os.environ["PTFLOW_CACHE_DIR"]
    rerun = run_script(store_url, tmp_path / "b", "load_tokenizer")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout.strip().splitlines()[-1])["load_tokenizer"]
    assert result["key"] == key and not result["hit"]
    assert f"cache/load_tokenizer/{key}/{MANIFEST}" in remote_names(s3, store_url)


def test_train_killed_mid_run_resumes_on_a_fresh_machine_from_the_newest_uploaded_checkpoint(s3, store_url,
                                                                                           tmp_path):
    killed = run_script(store_url, tmp_path / "a", "train", kill_at="train:step-7")
    assert killed.returncode == -9, killed.stderr[-3000:]
    work = [n for n in remote_names(s3, store_url) if ".work/" in n]
    assert {n.split("/")[3] for n in work if n.endswith("ptflow_checkpoint.json")} == {"checkpoint-3", "checkpoint-6"}

    resumed = run_script(store_url, tmp_path / "b", "train")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["load_tokenizer"]["hit"] and result["prepare_dataset"]["hit"]
    stats = result["train"]["stats"]
    assert stats["resumed_from"].endswith("checkpoint-6") and stats["total_steps"] == 8
    log = (tmp_path / "b" / "cache" / "train" / result["train"]["key"] / "trainer_log.jsonl").read_text()
    steps = [json.loads(line)["current_steps"] for line in log.splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # the log came along and no step is logged twice
    names = remote_names(s3, store_url)
    assert f"cache/train/{result['train']['key']}/{MANIFEST}" in names and not any(".work/" in n for n in names)


def test_cache_gc_sweeps_the_bucket_by_the_local_rules(s3, store_url, tmp_path, monkeypatch, capsys):
    """Unfinished uploads (no manifest), finished keys' checkpoint folders and, with --older-than, entries no
    lineage names go from the bucket; dry-run (`--dry-run`) lists them and removes nothing."""
    from flows.cli import main
    from ptflow.store import gc
    from ptflow.store.entries import build_or_reuse

    def write(text):
        return lambda folder: (folder / "data.txt").write_text(text) and {}

    on_machine(monkeypatch, tmp_path / "cpu")
    layout = Layout.resolve(store_url)
    named, unused = (build_or_reuse(layout, "demo", {"stage": "demo", "config": {"n": n}}, write(f"entry {n}"))
                     for n in (1, 2))
    prefix = store_url.removeprefix("s3://")
    s3.pipe(f"{prefix}/cache/demo/{'f' * 32}/data.txt", b"half")  # a writer killed before its manifest
    s3.pipe(f"{prefix}/cache/demo/{named.key}.work/checkpoint-3/weights", b"w")  # left by a killed publisher
    s3.pipe(f"{prefix}/lineage/nightly.jsonl", json.dumps({"key": named.key}).encode() + b"\n")

    swept = {p for p, _ in gc.collect(layout) if isinstance(p, str)}  # (and this machine's idle lock files)
    assert swept == {f"{store_url}/cache/demo/{named.key}.work"}  # the unfinished upload is recent: kept
    later = time.time() + 40 * 24 * 3600
    monkeypatch.setattr(time, "time", lambda: later)
    assert main(["cache", "gc", "--dry-run", "--older-than", "30", "--store", store_url]) == 0
    out = capsys.readouterr().out
    assert f"would remove {store_url}/cache/demo/{'f' * 32}  (upload left unfinished, no manifest.json" in out
    assert f"would remove {store_url}/cache/demo/{unused.key}  (unused entry, last used 40.0 days ago)" in out
    assert f"{store_url}/cache/demo/{named.key} " not in out  # the lineage names it
    before = remote_names(s3, store_url)
    assert f"cache/demo/{'f' * 32}/data.txt" in before
    assert main(["cache", "gc", "--older-than", "30", "--store", store_url]) == 0
    after = remote_names(s3, store_url)
    assert not any(n.startswith((f"cache/demo/{'f' * 32}/", f"cache/demo/{unused.key}/")) for n in after)
    assert f"cache/demo/{named.key}/{MANIFEST}" in after and f"cache/demo/{named.key}/data.txt" in after
