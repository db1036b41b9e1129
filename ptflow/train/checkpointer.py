"""The loop's checkpoint policy: which checkpoint to resume from, restoring it, saving and rotating.

File formats, the fingerprint check and torn-checkpoint detection live in `checkpoint`; this
module decides when and on which rank. Only rank 0 deletes, renames or writes the run's files
(the others wait at a barrier), so several processes never race on the same folder; with FSDP
every rank writes its own shards (torch.distributed.checkpoint) and nothing is gathered.
"""

from __future__ import annotations

import logging
import shutil
import time
from functools import partial
from pathlib import Path

from ptflow.config.schema import TrainSection
from ptflow.data.stream import Cursor
from ptflow.errors import CheckpointError
from ptflow.train import checkpoint as ckpt
from ptflow.train import sharding
from ptflow.train.checkpoint_sync import publish_checkpoints
from ptflow.train.distributed import Ranks

log = logging.getLogger("ptflow.train")


def resume_path(folder: Path, setting: str | bool, ranks: Ranks) -> Path | None:
    """The checkpoint to resume from; `false` deletes earlier checkpoints (rank 0 only, then a barrier)."""
    if setting is False or setting in ("false", "False"):
        if ranks.is_main:
            for _, path in ckpt.list_checkpoints(folder):
                shutil.rmtree(path)
        ranks.barrier()
        return None
    if setting in (True, "auto", "true", "True"):
        # rank 0 re-hashes the candidates (a 10B model's sharded checkpoint is ~120 GB) and the others take its pick
        found = ckpt.newest_valid(folder) if ranks.is_main else None
        found = ranks.broadcast(None if found is None else str(found))
        return None if found is None else Path(found)
    path = Path(str(setting)).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"train.resume_from_checkpoint: {path} is not a directory; give a checkpoint-<step> "
                              "folder, auto, or false")
    return path


class Checkpointer:
    """Resumes and saves one run's checkpoints under `folder`."""

    def __init__(self, folder: Path, train: TrainSection, ranks: Ranks, fingerprint: dict):
        self.folder, self.train, self.ranks, self.fingerprint = folder, train, ranks, fingerprint
        self.running: dict = {}  # the running loss sums of the checkpoint resumed from
        self.pending: tuple | None = None  # (step, future, extra, started) of a checkpoint written in the background

    def restore(self, net, optimizer, scheduler, streamed: bool) -> tuple[int, Path | None, Cursor | None]:
        """(start step, checkpoint resumed from, stream cursor) after loading the newest valid checkpoint into the
        wrapped model (`Ranks.wrap`; every rank loads the same one, so DDP replicas stay equal)."""
        path = resume_path(self.folder, self.train.resume_from_checkpoint, self.ranks)
        if path is None:
            return 0, None, None
        meta = ckpt.check_fingerprint(path, self.fingerprint)
        if streamed and "data_cursor" not in meta:
            raise CheckpointError(f"train.resume_from_checkpoint: {path} has no data cursor, so the stream cannot "
                                  "resume where it stopped; set train.resume_from_checkpoint: false to start over")
        model = self.ranks.unwrap(net)
        ckpt.load_checkpoint(path, model, optimizer, scheduler, load_states=partial(
            sharding.load_full_states, model, optimizer) if self.ranks.sharded else None)
        cursor = Cursor.from_json(meta["data_cursor"]) if streamed else None
        self.running = meta.get("running_loss", {})  # so train_loss and the next logged loss match an unbroken run
        return meta["step"], path, cursor

    def save(self, step: int, net, optimizer, scheduler, extra: dict) -> Path | None:
        """Write checkpoint-<step> (every rank calls it) and rotate old ones; its folder on rank 0, else None.

        With FSDP every rank writes its own shards into the temp folder first (no gather); rank 0 then
        adds the schedule, RNG and metadata and renames the folder into place.
        """
        ranks, sharded = self.ranks, self.ranks.sharded
        if sharded and self.train.async_checkpoint:
            self.start_background(step, net, optimizer, scheduler, extra)
            return None
        if sharded:
            self._write_shards(step, net, optimizer)
        ranks.barrier()
        saved = None
        if ranks.is_main:
            saved = ckpt.save_checkpoint(self.folder, step, ranks.unwrap(net), optimizer, scheduler,
                                         self.fingerprint, extra, sharded=sharded)
            ckpt.rotate(self.folder, self.train.save_total_limit)
            publish_checkpoints(self.folder, self.train.save_total_limit)  # an object store: upload it now
        ranks.barrier()  # nobody races ahead to a resume or deletion of a half-written folder
        return saved

    def _write_shards(self, step: int, net, optimizer, background_group=None):
        """Every rank's shards into checkpoint-<step>'s emptied temp folder (`sharding.save_sharded`)."""
        if self.ranks.is_main:
            ckpt.temp_folder(self.folder, step)
        self.ranks.barrier()
        return sharding.save_sharded(net, optimizer, self.folder / f".tmp-checkpoint-{step}" / ckpt.SHARDED,
                                     background_group=background_group)

    def start_background(self, step: int, net, optimizer, scheduler, extra: dict) -> None:
        """Copy this step's shards to host memory and write them from a thread; training goes on meanwhile.

        One checkpoint is in flight at a time (the previous one is sealed first, waiting for it if need be),
        so host memory holds at most one staged copy of the shards. The schedule, RNG and trainer state of
        this step are written now; hashing and the rename into place wait for every rank's write (`finish`).
        """
        ranks = self.ranks
        self.finish(wait=True)
        started = time.perf_counter()
        future = self._write_shards(step, net, optimizer, background_group=ranks.cpu_group())
        if ranks.is_main:
            ckpt.write_run_state(self.folder / f".tmp-checkpoint-{step}", scheduler, extra)
        self.pending = (step, future, extra, started)
        log.info("train: checkpoint-%d copied to host memory in %.1f s, writing in the background", step,
                 time.perf_counter() - started)

    def finish(self, wait: bool) -> Path | None:
        """Seal the checkpoint being written in the background (every rank calls it): at once with `wait`, else
        only if every rank's write is already done. Returns its folder on rank 0 once sealed."""
        if self.pending is None:
            return None
        step, future, extra, started = self.pending
        if not wait and not self.ranks.all_true(future.done()):
            return None
        failed = future.exception()  # waits for this rank's write
        self.pending = None
        ranks, saved = self.ranks, None
        if not ranks.all_true(failed is None):  # every rank stops together, none waits at a barrier for ever
            raise CheckpointError(f"train: writing checkpoint-{step} in the background failed"
                                  f"{f' on this rank: {failed}' if failed else ' on another rank'}; the previous "
                                  f"checkpoint in {self.folder} is kept") from failed
        if ranks.is_main:
            saved = ckpt.seal(self.folder, step, self.fingerprint, extra)
            ckpt.rotate(self.folder, self.train.save_total_limit)
            publish_checkpoints(self.folder, self.train.save_total_limit)
            log.info("train: %s sealed, %.1f s after its step", saved.name, time.perf_counter() - started)
        ranks.barrier()
        return saved
