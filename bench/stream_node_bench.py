"""Tokenizing CPU per rank when 2 ranks of a node stream one pass: every rank tokenizing (before) vs once per node.

Two processes read the same stream plan in lockstep (a barrier per step, as DDP steps are) with the
quickstart tokenizer, each keeping every block, either tokenizing every shard itself (`node=None`,
the behaviour before node-shared token files) or sharing through `NodeTokens`. Prints per rank: the
CPU seconds of tokenizing (BlockStream's counter), the process CPU seconds of the whole pass, and
shards tokenized / mapped; checks both modes produce the same blocks.

    python bench/stream_node_bench.py --mib 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

from ptflow.config.schema import DataSection
from ptflow.data import sources
from ptflow.data.node_tokens import NodeTokens
from ptflow.data.sources import resolve_sources
from ptflow.data.stream import BlockStream, StreamPlan
from ptflow.data.tokenizer import open_tokenizer

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
STEP_BLOCKS = 16


def corpus(folder: Path, mib: float) -> DataSection:
    lines = (QUICKSTART / "data" / "corpus.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    out, size, copy = [], 0, 0
    while size < mib * 2**20:
        for line in lines:  # each copy tagged, so shards are not byte-identical
            text = json.loads(line)["text"] + f" ({copy})"
            out.append(json.dumps({"text": text}) + "\n")
            size += len(out[-1])
        copy += 1
    (folder / "big.jsonl").write_text("".join(out), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"big": {"file_name": "big.jsonl"}}))
    return DataSection(dataset="big", dataset_dir=str(folder), cutoff_len=512, streaming=True, shuffle_shards=False)


def rank(local_rank: int, shared: bool, plan: StreamPlan, folder: str, barrier, results) -> None:
    tok = open_tokenizer(QUICKSTART / "model")
    node = NodeTokens(folder, local_rank, 2, "bench") if shared else None
    digest, cpu, wall = hashlib.sha256(), time.process_time(), time.perf_counter()
    with BlockStream(plan, tok, node=node) as stream:
        while stream.epoch == 0:
            blocks, _, _ = stream.take(STEP_BLOCKS)
            digest.update(blocks.tobytes())
            barrier.wait()
        counts = dict(stream.tokenizing)
    results[local_rank] = {**counts, "process_cpu_s": time.process_time() - cpu,
                           "wall_s": time.perf_counter() - wall, "blocks_sha": digest.hexdigest()[:12]}


def run(shared: bool, plan: StreamPlan, folder: str) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier, results = manager.Barrier(2), manager.dict()
        procs = [context.Process(target=rank, args=(r, shared, plan, folder, barrier, results)) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return [dict(results[r]) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=4.0, help="corpus size")
    parser.add_argument("--shard-kib", type=int, default=256, help="shard size")
    args = parser.parse_args()
    sources.MIN_SHARD_BYTES = sources.MAX_SHARD_BYTES = args.shard_kib * 1024
    with tempfile.TemporaryDirectory() as tmp:
        section = corpus(Path(tmp), args.mib)
        plan = StreamPlan.for_sources(resolve_sources(section), section)
        print(f"{args.mib} MiB corpus, {len(plan.shards)} shards, 2 ranks, {STEP_BLOCKS} blocks of 512 per step")
        for shared in (False, True):
            label = "once per node " if shared else "every rank    "
            for r, res in enumerate(run(shared, plan, str(Path(tmp) / "node"))):
                print(f"{label} rank {r}: tokenize CPU {res['tokenize_cpu_s']:6.2f} s, process CPU "
                      f"{res['process_cpu_s']:6.2f} s, wall {res['wall_s']:6.2f} s, tokenized "
                      f"{res['tokenized_shards']:3d}, mapped {res['shared_shards']:3d}, blocks {res['blocks_sha']}")


if __name__ == "__main__":
    main()
