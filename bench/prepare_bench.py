"""Data preparation throughput: ptflow's prepare_dataset vs LLaMA-Factory's pt preprocessing, same corpus and cores.

    python bench/prepare_bench.py --assets /tmp/anchors                  # corpus + tokenizer from build_assets.py
    python bench/prepare_bench.py --build /tmp/prep-assets               # build them here first (stdlib, ~30 s)
    python bench/prepare_bench.py --assets /tmp/anchors --repeats 3 --json results.json
    python bench/prepare_bench.py --rss 10e6,50e6,200e6 --scratch /tmp/prep-rss  # peak RSS per corpus size
    python bench/prepare_bench.py --stage --assets /tmp/anchors --workers 16 --repeats 3 \
        --lf-anchor .anchors/lf_anchor.py --lf-site /tmp/site-lf --json stage.json  # the stages end to end vs LF

Every measurement runs in a fresh Python process, one after the other (never concurrently), in
alternating order over --repeats rounds, so the two sides see the same machine state:

  ptflow        prepare_dataset() on an empty store: hash the input, check it, tokenize every shard
                (a process per core), pack into cutoff_len blocks, write train.npy, digest, manifest.
  ptflow-repack the same with cutoff_len/2 on the warm store: shards reused, re-packed only.
  lf            LLaMA-Factory 0.9.x get_dataset(stage="pt") written inline with the same calls:
                load_dataset("json", num_proc) -> per-example align map (its AlpacaDatasetConverter
                output columns) -> batched map (batch 1000) of its PretrainDatasetProcessor:
                text + eos_token, tokenizer(..., add_special_tokens=False), concatenate the batch,
                cut into cutoff_len blocks (the batch's remainder is dropped), num_proc processes.
                "lf map only" is the tokenize+pack map alone. A fresh datasets cache per run.

--rss SIZES builds one tokenizer and a corpus of about each size (tokens; the stdlib repeated) under
--scratch (default: the system temp dir) and times `ptflow` alone on each: peak RSS of the
preparing process (VmHWM), seconds and tokens/s. Flat peak RSS across sizes is the point: memory is
bounded by a shard, not by the corpus (each tokenizer worker holds one shard at a time).
PTFLOW_BENCH_CODE=/other/checkout measures another version of ptflow with the same driver.

--stage times what the flow runs from a cold store, end to end: the load_tokenizer and
prepare_dataset stage functions (each planned: key with input digests, then built), Prefect
excluded, transformers imported before the clock (printed on its own), in a fresh process per
round, and prints the best round's phases (bench/stage_timeline.py: hash, check, load the
tokenizer, start workers, tokenize, pack, digest, manifest; every second in one phase) with a
16-worker estimate when run on fewer. --lf-anchor runs the anchors' own lf_anchor.py preprocess
(LLaMA-Factory's get_dataset(stage="pt"), num_proc = --workers, tokenizer load and save excluded)
in the same rounds, alternating, with --lf-site first on its PYTHONPATH and the first model folder
of ASSETS/models (build_assets.py --models llama-160m), and prints LF seconds / ptflow seconds.

The ratio is LF seconds / ptflow seconds (the same corpus in, blocks out); "vs lf (CPU)" compares
CPU seconds of each run's whole process tree, which stays meaningful on a machine shared with
other work (wall-clock ratios there depend on who else is running). Tokens/s are each side's
own packed tokens per second (LF packs fewer: it drops each batch's remainder). Both sides use the
machine's cores: --workers (default: all) is ptflow's preprocessing_num_workers and LF's
preprocessing_num_workers (num_proc).

Needs numpy, tokenizers, transformers (with its regex), pyarrow, and datasets for the LF side; ptflow
is imported from this checkout (its config needs pydantic; without it a stand-in section is used).
No torch, no Prefect, no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the ptflow checkout the children import: this one, or another (PTFLOW_BENCH_CODE=/path) to compare versions
CODE = Path(os.environ.get("PTFLOW_BENCH_CODE", ROOT))


# --------------------------------------------------------------------------- assets


def build_assets(work: Path, min_tokens: int) -> None:
    """Same recipe as ../shared/anchors/build_assets.py: stdlib .py files, 32K byte-level BPE, repeated."""
    texts, unique = build_tokenizer(work / "tokenizer")
    write_corpus(work / "data", texts, unique, min_tokens)


def build_tokenizer(folder: Path) -> tuple[list[str], int]:
    """Train the 32K byte-level BPE on the stdlib's .py files; (those texts, their token count)."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    texts = [t for t in (p.read_bytes().decode("utf-8", errors="replace") for p in files) if t.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, min_frequency=2, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=2048)
    fast.save_pretrained(folder)
    return texts, sum(len(x) for x in fast(texts, add_special_tokens=False)["input_ids"])


def write_corpus(data: Path, texts: list[str], unique: int, min_tokens: int) -> None:
    """data/corpus.jsonl: `texts` repeated to at least `min_tokens` tokens, and its dataset_info.json."""
    import math

    repeats = max(1, math.ceil(min_tokens / unique))
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "corpus.jsonl", "w", encoding="utf-8") as f:
        for _ in range(repeats):
            for t in texts:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    (data / "dataset_info.json").write_text(json.dumps(
        {"stdlib_py": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}}, indent=2))
    print(f"built {data}: {len(texts)} files x {repeats} = {unique * repeats:,} tokens", file=sys.stderr)


def find_assets(assets: Path) -> tuple[Path, Path]:
    data = assets / "data"
    tokenizer = assets / "tokenizer"
    if not (data / "corpus.jsonl").is_file() or not (tokenizer / "tokenizer.json").is_file():
        sys.exit(f"{assets}: expected data/corpus.jsonl and tokenizer/tokenizer.json "
                 "(run ../shared/anchors/build_assets.py --work DIR, or this script with --build DIR)")
    return data, tokenizer


# --------------------------------------------------------------------------- one measurement (child process)


def run_ptflow(data: Path, tokenizer: Path, cutoff: int, workers: int, store: Path) -> dict:
    sys.path.insert(0, str(CODE))
    # prepare_dataset imports transformers lazily (to load the tokenizer); import it before the clock starts,
    # as run_lf does, so both sides time the work and not the imports (on the GPU image this pulls in torch:
    # about 9 s there, measured 2026-11-25).
    from transformers import AutoTokenizer  # noqa: F401

    from ptflow.data.dataset import prepare_dataset
    from ptflow.store.entries import Artifact, files_digest
    from ptflow.store.layout import Layout

    digest, _ = files_digest(tokenizer)
    tok = Artifact("load_tokenizer", "bench", str(tokenizer), digest)
    layout = Layout(store)
    started = time.perf_counter()
    artifact = prepare_dataset(_section(data, cutoff, workers), tok, layout)
    seconds = time.perf_counter() - started
    tokens = artifact.stats["train_tokens"]
    return {"seconds": seconds, "blocks": artifact.stats["train_blocks"], "tokens": tokens,
            "peak_rss_mib": _peak_rss_mib(),
            "shards_built": artifact.stats["shards_built"], "shards_reused": artifact.stats["shards_reused"],
            "dropped": artifact.stats["dropped_tokens"]}


def run_stage(data: Path, tokenizer: Path, cutoff: int, workers: int, store: Path) -> dict:
    """The tokenizer + prepare_dataset stages end to end on an empty store, as the flow calls them (each stage
    planned: its input digests, then built), Prefect excluded; with the phase breakdown of stage_timeline.py."""
    sys.path.insert(0, str(CODE))
    # What the flow's process has imported before its stages run (tasks.stages: the stage modules, and torch via
    # the train stage, which this measure leaves out). transformers is not among them: the tokenizer stage
    # imports it on a miss; timed here on its own, outside the stage clock, as LLaMA-Factory's is outside its own.
    import_started = time.perf_counter()
    from transformers import AutoTokenizer  # noqa: F401
    import_s = time.perf_counter() - import_started

    from stage_timeline import Timeline, estimate, worker_summary

    from ptflow.data import dataset
    from ptflow.data import tokenizer as tokenizer_stage
    from ptflow.store.layout import Layout

    timeline = Timeline.install()
    layout = Layout(store)
    model = _model_section(tokenizer)
    section = _section(data, cutoff, workers)
    started = time.perf_counter()
    with timeline.stage("load_tokenizer"):
        with timeline.phase("hash tokenizer files (key)"):
            planned = tokenizer_stage.STAGE.plan(model, layout)
        tok = planned.build()
    with timeline.stage("prepare_dataset"):
        with timeline.phase("hash inputs (key)"):
            planned = dataset.STAGE.plan(section, tok, layout, 42)
        artifact = planned.build()
    seconds = time.perf_counter() - started
    _wait_for_workers()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    _reap_fork_server()  # the workers' CPU time: the fork server reaped them, this process reaps it
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = timeline.phases()
    summary = worker_summary(timeline.shard_results, workers)
    summary["worker_cpu_s"] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3)
    return {"seconds": seconds, "import_transformers_s": import_s, "blocks": artifact.stats["train_blocks"],
            "tokens": artifact.stats["train_tokens"], "peak_rss_mib": _peak_rss_mib(),
            "phases": [{"stage": st, "phase": ph, "seconds": round(sec, 4)} for st, ph, sec in rows],
            "workers": summary, "estimate_16_workers_s": round(estimate(rows, summary, 16), 3)}


def _model_section(tokenizer: Path):
    try:
        from ptflow.config.schema import ModelSection
    except ImportError:  # no pydantic: a stand-in with what load_tokenizer reads
        import dataclasses

        @dataclasses.dataclass
        class ModelSection:  # noqa: D401 - mirrors ptflow.config.ModelSection's tokenizer fields
            model_name_or_path: str
            model_revision: str = "main"
            use_fast_tokenizer: bool = True
            trust_remote_code: bool = False

            def tokenizer_fields(self) -> dict:
                return {"model_revision": self.model_revision, "use_fast_tokenizer": self.use_fast_tokenizer,
                        "trust_remote_code": self.trust_remote_code}

    return ModelSection(model_name_or_path=str(tokenizer))


def _section(data: Path, cutoff: int, workers: int):
    fields = {"dataset": ["stdlib_py"], "dataset_dir": str(data), "cutoff_len": cutoff,
              "preprocessing_num_workers": workers}
    try:
        from ptflow.config.schema import DataSection
    except ImportError:  # no pydantic: a plain stand-in with the defaults prepare_dataset reads
        import dataclasses

        @dataclasses.dataclass
        class DataSection:  # noqa: D401 - mirrors ptflow.config.DataSection's fields
            dataset: list
            dataset_dir: str
            cutoff_len: int
            preprocessing_num_workers: int
            eval_dataset: list | None = None
            val_size: float = 0.0
            max_samples: int | None = None
            mix_strategy: str = "concat"
            interleave_probs: list | None = None
            packing: bool = True
            doc_mask: bool = False
            preprocessing_batch_size: int = 1000
            streaming: bool = False
            shuffle_shards: bool = True

            def digest_fields(self) -> dict:
                return dataclasses.asdict(self)

    return DataSection(**fields)


def run_lf(data: Path, tokenizer_dir: Path, cutoff: int, workers: int, cache: Path) -> dict:
    """LLaMA-Factory's get_dataset(stage='pt') path, inline (data/loader.py, converter.py, processor/pretrain.py)."""
    from itertools import chain

    from datasets import disable_progress_bars, load_dataset
    from transformers import AutoTokenizer

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    started = time.perf_counter()
    # loader._load_single_dataset: load_dataset("json", data_files=..., split="train", num_proc=...)
    dataset = load_dataset("json", data_files=[str(data / "corpus.jsonl")], split="train", cache_dir=str(cache),
                           num_proc=workers)
    loaded = time.perf_counter()

    # converter.align_dataset: AlpacaDatasetConverter, batched=False, one example at a time
    def convert(example):
        return {"_prompt": [{"role": "user", "content": example["text"]}], "_response": [], "_system": "",
                "_tools": "", "_images": None, "_videos": None, "_audios": None}

    dataset = dataset.map(convert, batched=False, remove_columns=dataset.column_names, num_proc=workers,
                          load_from_cache_file=False, desc="Converting format of dataset")
    converted = time.perf_counter()

    # processor/pretrain.py: PretrainDatasetProcessor.preprocess_dataset (packing), batched map of 1000
    eos_token = tokenizer.eos_token

    def preprocess(examples):
        text_examples = [messages[0]["content"] + eos_token for messages in examples["_prompt"]]
        tokenized_examples = tokenizer(text_examples, add_special_tokens=False)
        concatenated = {k: list(chain(*tokenized_examples[k])) for k in tokenized_examples.keys()}
        total_length = len(concatenated[list(concatenated.keys())[0]])
        total_length = (total_length // cutoff) * cutoff
        result = {k: [t[i: i + cutoff] for i in range(0, total_length, cutoff)] for k, t in concatenated.items()}
        if getattr(tokenizer, "add_bos_token", False):
            for i in range(len(result["input_ids"])):
                result["input_ids"][i][0] = tokenizer.bos_token_id
        return result

    dataset = dataset.map(preprocess, batched=True, batch_size=1000, remove_columns=dataset.column_names,
                          num_proc=workers, load_from_cache_file=False, desc="Running tokenizer on dataset")
    finished = time.perf_counter()
    return {"seconds": finished - started, "map_seconds": finished - converted, "load_seconds": loaded - started,
            "convert_seconds": converted - loaded, "blocks": len(dataset), "tokens": len(dataset) * cutoff}


def _peak_rss_mib() -> float:
    """This process's peak RSS since it started. Not ru_maxrss: Linux carries that over from the parent
    across fork + exec, so a child of a big driver process would report the driver's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(args) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="prepare-bench-", dir=args.scratch))
    try:
        data, tokenizer = find_assets(args.assets)
        if args.child == "lf":
            result = run_lf(data, tokenizer, args.cutoff, args.workers, scratch / "hf-cache")
        elif args.child == "ptflow":
            result = run_ptflow(data, tokenizer, args.cutoff, args.workers, scratch / "store")
        elif args.child == "stage":
            result = run_stage(data, tokenizer, args.cutoff, args.workers, scratch / "store")
        else:  # ptflow-repack: fill the shard cache untimed, then time a cutoff change
            run_ptflow(data, tokenizer, args.cutoff, args.workers, scratch / "store")
            before = _cpu()
            result = run_ptflow(data, tokenizer, args.cutoff // 2, args.workers, scratch / "store")
            result["cpu_seconds"] = _cpu() - before
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        _reap_fork_server()
    print("RESULT " + json.dumps(result))


def _wait_for_workers(limit_s: float = 60.0) -> None:
    """Until every worker process has exited and been reaped (the stage lets its pool go without waiting), so that
    their CPU time is in the fork server's, and then in this process's, children's rusage."""
    import multiprocessing

    deadline = time.monotonic() + limit_s
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.01)


def _reap_fork_server() -> None:
    """Stop and wait for multiprocessing's fork server (ptflow's tokenizer workers are its children), so the CPU
    time of the workers it reaped is counted in this process tree's rusage."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # private, Python >= 3.9
    if stop is not None:
        stop()


# --------------------------------------------------------------------------- driver


def measure(kind: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--assets", str(args.assets),
           "--cutoff", str(args.cutoff), "--workers", str(args.workers)]
    if args.scratch:
        cmd += ["--scratch", str(args.scratch)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    # CODE first for the tokenizer workers too: their fork server is a fresh interpreter that may import its preloaded
    # modules from its own sys.path, working directory first (Python 3.11 does), not from the child's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(CODE), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(CODE), env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{kind} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    # CPU seconds of the whole process tree (workers included), imports and setup too
    result.setdefault("cpu_seconds", (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    result["loadavg_before"] = load
    print(f"  {kind:<14} {result['seconds']:7.2f} s  {result['tokens'] / result['seconds'] / 1e6:6.3f}M tok/s  "
          f"{result['cpu_seconds']:7.1f} CPU s (process tree)  load avg before {load:.1f}", file=sys.stderr)
    return result


def run_lf_anchor(args) -> dict:
    """The anchors' `lf_anchor.py preprocess` (LLaMA-Factory's get_dataset(stage="pt"), save time excluded) on the
    same corpus and process count, in its own process with a fresh datasets cache."""
    models = args.assets / "models"
    names = sorted(p.name for p in models.iterdir() if (p / "config.json").is_file()) if models.is_dir() else []
    name = args.lf_model or (names[0] if names else None)
    if name is None or not (models / name / "config.json").is_file():
        sys.exit(f"{models}: no model folder {name or ''} with config.json for LLaMA-Factory "
                 "(build_assets.py --models llama-160m writes one); or name one with --lf-model")
    scratch = Path(tempfile.mkdtemp(prefix="prepare-bench-lf-", dir=args.scratch))
    env = {**os.environ, "HF_DATASETS_CACHE": str(scratch / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    if args.lf_site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.lf_site.resolve()), env.get("PYTHONPATH")) if p)
    if not args.lf_cpu and shutil.which("nvidia-smi"):
        # LLaMA-Factory's argument check refuses several visible GPUs outside torchrun ("Please launch distributed
        # training"), and an empty list with bf16; preprocessing never touches the GPU, so show it exactly one
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "0").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[0] if visible else "0"
    cmd = [sys.executable, str(args.lf_anchor.resolve()), "preprocess", "--model-dir", str(models / name),
           "--dataset-dir", str(args.assets / "data"), "--output-dir", str(scratch / "out"),
           "--result", str(scratch / "lf.json"), "--cutoff", str(args.cutoff), "--num-proc", str(args.workers)]
    cmd += ["--no-bf16"] if args.lf_cpu else []
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode or not (scratch / "lf.json").is_file():
            sys.exit(f"lf_anchor.py preprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        res = json.loads((scratch / "lf.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"seconds": res["preprocess_s"], "get_dataset_s": res["get_dataset_s"],
              "save_to_disk_s": res["save_to_disk_s"], "tokenizer_load_s": res["tokenizer_load_s"],
              "blocks": res["blocks"], "tokens": res["tokens_packed"], "num_proc": res["num_proc"], "model": name,
              "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
              "loadavg_before": load}
    print(f"  {'lf_anchor':<14} {result['seconds']:7.2f} s  {result['tokens'] / result['seconds'] / 1e6:6.3f}M tok/s  "
          f"{result['cpu_seconds']:7.1f} CPU s (process tree, imports included)  load avg before {load:.1f}",
          file=sys.stderr)
    return result


def measure_stage(args) -> None:
    """--stage: the two stages end to end in a fresh process per round, alternating with LLaMA-Factory's
    preprocessing when --lf-anchor is given; the best round's phases, the ratio, and a 16-worker estimate."""
    kinds = ["stage"] + (["lf"] if args.lf_anchor else [])
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    print(f"prepare_bench --stage: {args.assets}, cutoff {args.cutoff}, {args.workers} workers, {args.repeats} "
          f"round(s)", file=sys.stderr)
    for round_ in range(args.repeats):
        for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
            runs[kind].append(run_lf_anchor(args) if kind == "lf" else measure("stage", args))
    best = min(runs["stage"], key=lambda r: r["seconds"])
    device = f"{platform.node()}: {len(os.sched_getaffinity(0))} cores, {platform.processor() or platform.machine()}"
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}  {device}  load avg {os.getloadavg()[0]:.1f}  tokenizer + "
          f"prepare_dataset stages, empty store, {args.workers} workers (best of {args.repeats}: "
          f"{_seconds(runs['stage'])} s)")
    width = max(len(p["phase"]) for p in best["phases"])
    for p in best["phases"]:
        share = 100 * p["seconds"] / best["seconds"]
        print(f"  {p['stage']:<16} {p['phase']:<{width}} {p['seconds']:8.3f} s {share:5.1f}%")
    w = best["workers"]
    print(f"  workers: {w['shards_built']} shards built in {w['shard_busy_s']:.2f} busy s, {w['worker_cpu_s']:.2f} "
          f"CPU s (longest shard {w['longest_shard_s']:.2f} s); {best['tokens']:,} tokens in {best['blocks']:,} "
          "blocks; "
          f"peak RSS {best['peak_rss_mib']:.0f} MiB; outside the clock: import transformers "
          f"{best['import_transformers_s']:.2f} s")
    if args.workers < 16:
        print("  estimate on 16 workers (other phases as measured; tokenize = workers' CPU s / 16 + the longest "
              f"shard): {best['estimate_16_workers_s']:.2f} s")
    if runs.get("lf"):
        lf = min(runs["lf"], key=lambda r: r["seconds"])
        print(f"  LLaMA-Factory get_dataset(stage=pt), {lf['num_proc']} processes, save excluded: "
              f"{lf['seconds']:.2f} s "
              f"(best of {len(runs['lf'])}: {_seconds(runs['lf'])} s); "
              f"{lf['tokens']:,} tokens in {lf['blocks']:,} blocks")
        print(f"  ratio LF / ptflow stage: {lf['seconds'] / best['seconds']:.2f}x (target >= 2x); CPU "
              f"{lf['cpu_seconds']:.1f} s vs {best['cpu_seconds']:.1f} s (process trees, imports included)")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": runs}, indent=2))


def _seconds(runs: list[dict]) -> str:
    return ", ".join(f"{r['seconds']:.2f}" for r in runs)


def measure_rss(args) -> None:
    """Peak RSS and tokens/s of prepare_dataset on corpora of each --rss size (one tokenizer, built once)."""
    scratch = Path(args.scratch or tempfile.gettempdir()) / "prepare-rss"
    scratch.mkdir(parents=True, exist_ok=True)
    texts, unique = None, None
    rows = [("tokens", "seconds", "Mtok/s", "CPU s", "peak RSS MiB")]
    for size in [int(float(x)) for x in args.rss.split(",")]:
        assets = scratch / f"{size}"
        if not (assets / "data" / "corpus.jsonl").is_file():
            if texts is None:
                texts, unique = build_tokenizer(scratch / "tokenizer")
            write_corpus(assets / "data", texts, unique, size)
        if not (assets / "tokenizer").exists():
            (assets / "tokenizer").symlink_to(scratch / "tokenizer")
        args.assets = assets
        r = measure("ptflow", args)
        rows.append((f"{r['tokens']:,}", f"{r['seconds']:.1f}", f"{r['tokens'] / r['seconds'] / 1e6:.3f}",
                     f"{r['cpu_seconds']:.0f}", f"{r['peak_rss_mib']:.0f}"))
    device = f"{platform.node()}: {len(os.sched_getaffinity(0))} cores, {platform.processor() or platform.machine()}"
    print(f"\n{time.strftime('%Y-%m-%d')}  {device}  prepare_dataset, {args.workers} workers, cutoff {args.cutoff}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, help="folder with data/corpus.jsonl and tokenizer/ (build_assets.py)")
    parser.add_argument("--build", type=Path, metavar="DIR", help="build the corpus and tokenizer into DIR first")
    parser.add_argument("--min-tokens", type=int, default=1 << 24, help="with --build: repeat the corpus to this size")
    parser.add_argument("--cutoff", type=int, default=2048, help="cutoff_len (block length)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes on both sides (default: every available core)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (ptflow, lf), alternating order")
    parser.add_argument("--skip-lf", action="store_true", help="measure ptflow only")
    parser.add_argument("--json", type=Path, help="also write all results here")
    parser.add_argument("--scratch", type=Path, help="where stores and caches go (default: the system temp dir)")
    parser.add_argument("--rss", metavar="SIZES", help="comma-separated corpus sizes in tokens (e.g. 10e6,50e6): "
                        "peak RSS and tokens/s of ptflow alone on each")
    parser.add_argument("--stage", action="store_true", help="time the tokenizer + prepare_dataset stages end to end "
                        "(fresh process, empty store) with a phase breakdown; with --lf-anchor, against the anchors' "
                        "LLaMA-Factory preprocessing in the same call")
    parser.add_argument("--lf-anchor", type=Path, metavar="LF_ANCHOR_PY",
                        help="with --stage: the anchors' lf_anchor.py, run as `lf_anchor.py preprocess`")
    parser.add_argument("--lf-site", type=Path, metavar="DIR", help="with --lf-anchor: a site folder with "
                        "LLaMA-Factory and its dependencies, put first on its PYTHONPATH")
    parser.add_argument("--lf-model", metavar="NAME", help="with --lf-anchor: the model folder under ASSETS/models "
                        "(default: the first one); LLaMA-Factory reads the tokenizer from it")
    parser.add_argument("--lf-cpu", action="store_true", help="with --lf-anchor: pass --no-bf16 (no GPU here)")
    parser.add_argument("--child", choices=["ptflow", "ptflow-repack", "lf", "stage"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss and not args.child:
        return measure_rss(args)
    if args.build:
        build_assets(args.build, args.min_tokens)
        args.assets = args.assets or args.build
    if args.assets is None:
        parser.error("give --assets DIR (or --build DIR)")
    args.assets = args.assets.resolve()
    if args.child:
        return child(args)
    find_assets(args.assets)
    if args.stage:
        return measure_stage(args)
    if args.lf_anchor:
        parser.error("--lf-anchor goes with --stage")

    kinds = ["ptflow"] + ([] if args.skip_lf else ["lf"])
    runs: dict[str, list[dict]] = {k: [] for k in [*kinds, "ptflow-repack"]}
    print(f"prepare_bench: {args.assets}, cutoff {args.cutoff}, {args.workers} workers, {args.repeats} round(s)",
          file=sys.stderr)
    for round_ in range(args.repeats):
        for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
            runs[kind].append(measure(kind, args))
    runs["ptflow-repack"].append(measure("ptflow-repack", args))

    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items() if v}
    rows = [("run", "seconds", "CPU s", "blocks", "tokens", "Mtok/s", "vs lf (wall)", "vs lf (CPU)")]
    lf = best.get("lf")
    for kind, r in best.items():
        rows.append((kind, f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.1f}", f"{r['blocks']:,}", f"{r['tokens']:,}",
                     f"{r['tokens'] / r['seconds'] / 1e6:.3f}",
                     f"{lf['seconds'] / r['seconds']:.2f}x" if lf else "-",
                     f"{lf['cpu_seconds'] / r['cpu_seconds']:.2f}x" if lf else "-"))
    if lf:
        rows.append(("lf map only", f"{lf['map_seconds']:.2f}", "", f"{lf['blocks']:,}", f"{lf['tokens']:,}",
                     f"{lf['tokens'] / lf['map_seconds'] / 1e6:.3f}",
                     f"{lf['map_seconds'] / best['ptflow']['seconds']:.2f}x", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    device = f"{platform.node()}: {len(os.sched_getaffinity(0))} cores, {platform.processor() or platform.machine()}"
    print(f"\n{time.strftime('%Y-%m-%d')}  {device}  (best of {args.repeats}; ratio = LF seconds / ptflow seconds)")
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
