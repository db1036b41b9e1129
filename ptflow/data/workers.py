"""The tokenizer worker pool: one kind of process pool, and one rule for how many workers, for every tokenizing job.

The token cache (shards.py, preparing a dataset) and the stream (stream.py, beside training) both
start a `WorkerPool`; each worker builds its state once (`setup(*args)`: the tokenizer from its
serialized JSON, the store layout) and then runs module-level functions `fn(state, item)` on it.

    pool = WorkerPool(default_workers(), worker_state, (encoding, str(layout.root)))
    future = pool.submit(tokenize_in_worker, task)

Starting workers is a fixed cost of every tokenizing job (tenths of a second, which on 16 cores is a tenth of
preparing 18M tokens): the fork server, a fresh interpreter importing the tokenizing modules, is started once
per process, and `start_early()` starts it in the background while the caller still checks inputs and loads
the tokenizer; each worker then forks from it with those modules already imported. Workers never re-run the
parent's `__main__` (multiprocessing would, in every worker: for a deployed flow run that is `prefect.engine`,
about a second of imports each), so `setup` and `fn` must live in importable modules.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager

_STATE: dict = {}
_MAIN_LOCK = threading.Lock()  # one thread at a time hides and restores __main__'s origin (see _main_left_alone)
# what every tokenizer worker imports, imported once in the fork server instead (tokenizers and regex are
# imported lazily by the worker's setup; a module missing here is skipped by multiprocessing)
PRELOAD = ["ptflow.data.shards", "tokenizers", "regex"]


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(beside_training: bool = False) -> int:
    """Tokenizer processes: every available core to prepare a dataset; beside a training process (streaming) a few,
    min(4, cores / 2), and none on a machine of 2 cores or fewer (the trainer needs them)."""
    cores = available_cores()
    if not beside_training:
        return cores
    return min(4, cores // 2) if cores > 2 else 0


def worker_context():
    """Start method for tokenizer processes: a fork server (forked from a small process that imported only the
    shard module: quick to start even beside a parent holding torch and CUDA), else spawn. Never plain fork: the
    parent is threaded (Prefect, Rust pools)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def start_early() -> None:
    """Start the fork server now, without waiting for it: it imports PRELOAD (a few tenths of a second) while the
    caller goes on; a pool started later forks its workers from it. No-op where workers are spawned."""
    if worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _init(setup: Callable[..., dict], args: tuple) -> None:
    _STATE.update(setup(*args))


def _call(fn: Callable[[dict, object], object], item: object) -> object:
    return fn(_STATE, item)


class WorkerPool:
    """`workers` processes that each run `setup(*args)` once, then `fn(state, item)` per submitted item."""

    def __init__(self, workers: int, setup: Callable[..., dict], args: tuple):
        self.executor = ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=_init,
                                            initargs=(setup, args))

    def submit(self, fn: Callable[[dict, object], object], item: object) -> Future:
        with _main_left_alone():  # the executor starts its worker processes inside submit
            return self.executor.submit(_call, fn, item)

    def close(self, wait: bool = True) -> None:
        """Stop the workers; queued items are cancelled."""
        self.executor.shutdown(wait=wait, cancel_futures=True)


@contextmanager
def _main_left_alone() -> Iterator[None]:
    """Hide where `__main__` came from while worker processes start, so that multiprocessing does not tell
    them to import it (it reads `__main__.__spec__` and `__file__` to decide). The module object itself stays
    in place: other threads that pickle its objects meanwhile are unaffected."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _MAIN_LOCK:  # two threads interleaving would restore each other's hidden state
        saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
        try:
            yield
        finally:
            if "__spec__" not in saved:
                main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)
