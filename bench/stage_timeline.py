"""Phase breakdown of ptflow's tokenizer + prepare_dataset stages, timed from outside (bench/prepare_bench.py --stage).

The parent's phases come from wrapping the functions the stage calls (wall clock intervals);
the workers' from each built shard's `ShardResult.started` / `.seconds`. Every second of the
stage lands in one phase: what no wrapped call covers is reported as "other" of its stage, so a
phase that moves or disappears in a refactor shows up there instead of vanishing.

    timeline = Timeline.install()            # before the stage runs, in the measuring process
    ... tokenizer.STAGE.plan(...).build(); dataset.STAGE.plan(...).build() inside timeline.stage(name) ...
    rows = timeline.phases()                 # [(stage, phase, seconds)], in stage order
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager

# (module, attribute, phase): the calls the stages make, wrapped where they are looked up
WRAPPED = [
    ("ptflow.data.dataset", "resolve_all", "resolve sources"),
    ("ptflow.data.dataset", "check_sources", "check sources (first record of each file)"),
    ("ptflow.data.dataset", "open_tokenizer", "load tokenizer (AutoTokenizer)"),
    ("ptflow.data.tokenizer", "open_tokenizer", "load tokenizer (AutoTokenizer)"),
    ("ptflow.data.dataset", "plan_shards", "plan shards, look up the token cache"),
    ("ptflow.data.shards", "plan_tasks", "plan shards, look up the token cache"),
    ("ptflow.data.shards", "cached", "plan shards, look up the token cache"),
    ("ptflow.data.shards", "encoding_for", "serialize the tokenizer for the workers"),
    ("ptflow.data.shards", "_read_index", "token cache index"),
    ("ptflow.data.shards", "_update_index", "token cache index"),
    ("ptflow.data.dataset", "_build_stored", "order, pack, write blocks"),
    ("ptflow.store.entries", "explain_miss", "explain the miss (newest entry of the stage)"),
    ("ptflow.store.entries", "files_digest", "digest outputs"),
    ("ptflow.store.entries", "make_read_only", "manifest, read-only, rename"),
    ("ptflow.store.entries", "write_json_atomic", "manifest, read-only, rename"),
    ("ptflow.data.dataset", "log_summary", "log the summary"),
    ("ptflow.data.tokenizer", "fix_special_tokens", "fix special tokens"),
]
POOL = ("ptflow.data.shards", "WorkerPool")
SHARDS = ("ptflow.data.dataset", "tokenize_sources")  # its result: every shard, with the workers' timings


class Timeline:
    def __init__(self):
        self.intervals: list[tuple[str, str, float, float]] = []  # (stage, phase, start, end), wall clock
        self.current = ""
        self.windows: dict[str, tuple[float, float]] = {}
        self.pool_started: list[float] = []
        self.pool_closed: list[float] = []
        self.shard_results: list = []

    @classmethod
    def install(cls) -> "Timeline":
        import importlib

        timeline = cls()
        for module_name, attr, phase in WRAPPED:
            module = importlib.import_module(module_name)
            if not hasattr(module, attr):
                raise SystemExit(f"stage_timeline: {module_name}.{attr} is gone; update WRAPPED in {__file__}")
            setattr(module, attr, timeline._wrap(getattr(module, attr), phase))
        module = importlib.import_module(POOL[0])
        setattr(module, POOL[1], timeline._pool_class(getattr(module, POOL[1])))
        module = importlib.import_module(SHARDS[0])
        setattr(module, SHARDS[1], timeline._capture(getattr(module, SHARDS[1])))
        return timeline

    def _capture(self, fn):
        @functools.wraps(fn)
        def capture(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.shard_results += [r for source in out.values() for r in source.shards]
            return out
        return capture

    def _wrap(self, fn, phase: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.intervals.append((self.current, phase, start, time.time()))
        return timed

    def _pool_class(self, pool_cls):
        timeline = self

        class TimedPool(pool_cls):
            def __init__(self, *args, **kwargs):
                timeline.pool_started.append(time.time())
                super().__init__(*args, **kwargs)

            def close(self, *args, **kwargs):
                start = time.time()
                timeline.pool_closed.append(start)
                try:
                    return super().close(*args, **kwargs)
                finally:
                    timeline.intervals.append((timeline.current, "stop worker processes", start, time.time()))
        return TimedPool

    @contextmanager
    def stage(self, name: str):
        """Attribute what runs inside to stage `name` (its window: the whole block)."""
        self.current, start = name, time.time()
        try:
            yield
        finally:
            self.windows[name] = (start, time.time())
            self.current = ""

    @contextmanager
    def phase(self, name: str):
        start = time.time()
        try:
            yield
        finally:
            self.intervals.append((self.current, name, start, time.time()))

    def phases(self) -> list[tuple[str, str, float]]:
        """(stage, phase, seconds) of every stage window, outermost intervals only, the rest as "other"; the
        worker pool as "start worker processes" (pool created -> first shard begins in a worker) and "tokenize in
        workers" (first shard begins -> the pool is told to stop)."""
        intervals = list(self.intervals)
        built = [r for r in self.shard_results if not r.hit and r.started]
        if self.pool_started and built:
            first = min(r.started for r in built)
            stage = next((s for s, (a, b) in self.windows.items() if a <= self.pool_started[0] <= b), "")
            intervals.append((stage, "start worker processes (until the first shard begins)", self.pool_started[0],
                              first))
            end = self.pool_closed[0] if self.pool_closed else max(r.started + r.seconds for r in built)
            intervals.append((stage, "tokenize in workers (first shard begins -> last result)", first, end))
        rows = []
        for stage, (start, end) in self.windows.items():
            mine = sorted((i for i in intervals if i[0] == stage and start <= i[2] <= end), key=lambda i: (i[2], -i[3]))
            outer, reach = [], start
            for interval in mine:  # drop intervals nested in an earlier one (a digest inside a shard build, ...)
                if interval[2] >= reach:
                    outer.append(interval)
                    reach = interval[3]
            totals: dict[str, float] = {}
            for _, phase, a, b in outer:
                totals[phase] = totals.get(phase, 0.0) + (b - a)
            totals["other (stage code between the calls above)"] = (end - start) - sum(totals.values())
            rows += [(stage, phase, seconds) for phase, seconds in totals.items()]
            rows.append((stage, "= stage total", end - start))
        return rows


def worker_summary(shard_results: list, workers: int) -> dict:
    """What the workers did: shards built, their busy seconds (sum of per-shard build time), the longest shard."""
    built = [r for r in shard_results if not r.hit]
    busy = sum(r.seconds for r in built)
    return {"shards_built": len(built), "shards_reused": len(shard_results) - len(built), "workers": workers,
            "shard_busy_s": round(busy, 3), "longest_shard_s": round(max((r.seconds for r in built), default=0.0), 3),
            "tokens": sum(r.tokens for r in built)}


def estimate(rows: list[tuple[str, str, float]], summary: dict, cores: int) -> float:
    """Stage seconds on `cores` workers: every phase as measured except the tokenizing, which becomes the workers'
    CPU seconds / cores plus one longest shard (the tail). An Amdahl estimate, not a measurement; CPU time rather
    than the shards' wall time, which on a shared machine counts other people's work. Worker start stays as
    measured (it does not shrink with more cores), and the workers' start-up CPU is counted again in their CPU
    seconds: the estimate errs high."""
    total = sum(s for _, phase, s in rows if phase == "= stage total")
    tokenize = sum(s for _, phase, s in rows if phase.startswith("tokenize in workers"))
    longest = summary["longest_shard_s"] * summary["worker_cpu_s"] / max(summary["shard_busy_s"], 1e-9)  # as CPU s
    return total - tokenize + summary["worker_cpu_s"] / cores + longest
