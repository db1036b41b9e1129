"""Resumable checkpoints: `checkpoint-<step>/` with weights, optimizer, scheduler, RNG, data cursor.

A checkpoint is written into a hidden temp folder and renamed into place, and
`ptflow_checkpoint.json` (its fingerprint, step, and each file's size and sha256) is the last
file written inside it; files and folder are fsynced before the rename, so a power cut cannot
leave a named checkpoint with empty files. A checkpoint whose meta is missing or whose files do
not match it (torn, truncated, bit rot) is skipped for the next older intact one, with a log line
naming it. The fingerprint (dataset digest, tokenizer digest, train-config hash, world size)
must match to resume; a mismatch names the field.

Weights and optimizer state are either `trainable.safetensors` + `optimizer.pt` (one process or
DDP: rank 0 copies them to the CPU) or, with FSDP, a `sharded/` torch.distributed.checkpoint folder
that every rank writes its own shards into (see `sharding.save_sharded`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ptflow import faults
from ptflow.errors import CheckpointError
from ptflow.store.entries import sha256_files, sha256_json
from ptflow.train import sharding

log = logging.getLogger("ptflow.checkpoint")

META = "ptflow_checkpoint.json"
WEIGHTS = "trainable.safetensors"
SHARDED = "sharded"  # FSDP: a torch.distributed.checkpoint folder (its .metadata is written last)
# Train keys that only say how a step's blocks are split over processes, micro-batches and shards: a checkpoint
# made with other values continues the same run as long as a step still holds as many blocks (`global_batch`).
LAYOUT_KEYS = ("num_processes", "per_device_train_batch_size", "gradient_accumulation_steps", "fsdp")
WHY_BATCH = ("the data cursor counts steps of per_device_train_batch_size x gradient_accumulation_steps x processes "
             "blocks and the learning-rate schedule counts those steps, so another number of blocks per step would "
             "train on other batches than the run it continues; the process count may change as long as that "
             "product stays the same")
NAME = re.compile(r"^checkpoint-(\d+)$")
FILES = (WEIGHTS, "optimizer.pt", "scheduler.pt", "rng_state.pth")


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Parameters that change during training (all for full, the adapters for lora), copied to the CPU one by one.

    A copy per tensor straight to host memory: no second copy of the whole model on the GPU.
    """
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters()
            if p.requires_grad}


def temp_folder(folder: Path, step: int) -> Path:
    """The hidden folder checkpoint-<step> is written into, emptied (before the ranks write sharded state)."""
    tmp = folder / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, fingerprint: dict, extra: dict,
                    sharded: bool = False) -> Path:
    """`sharded`: the ranks already wrote weights and optimizer into temp_folder(...)/sharded (FSDP)."""
    tmp = folder / f".tmp-checkpoint-{step}"
    if not sharded:
        tmp = temp_folder(folder, step)
        save_file(trainable_state(model), tmp / WEIGHTS)
    faults.point(f"checkpoint:writing-{step}")
    if not sharded:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    write_run_state(tmp, scheduler, extra)
    return seal(folder, step, fingerprint, extra)


def write_run_state(tmp: Path, scheduler, extra: dict) -> None:
    """The schedule, RNG states and trainer state of the step being saved, into its temp folder."""
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng_state.pth")
    (tmp / "trainer_state.json").write_text(json.dumps(extra.get("trainer_state", {}), indent=2))


def seal(folder: Path, step: int, fingerprint: dict, extra: dict) -> Path:
    """Hash every file of the temp folder into the meta (written last), flush and rename it into place."""
    final, tmp = folder / f"checkpoint-{step}", folder / f".tmp-checkpoint-{step}"
    written = sorted(f for f in tmp.rglob("*") if f.is_file())  # sharded/ holds every rank's shard files
    digests = sha256_files(written)
    files = {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": digests[f]} for f in written}
    meta = {"step": step, "fingerprint": fingerprint, "files": files,
            **{k: v for k, v in extra.items() if k != "trainer_state"}}
    (tmp / META).write_text(json.dumps(meta, indent=2))
    for path in [*written, tmp / META, *(d for d in tmp.rglob("*") if d.is_dir()), tmp]:
        _fsync(path)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(folder)
    return final


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk (a rename is only durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    if folder.is_dir():
        for entry in folder.iterdir():
            match = NAME.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def damage(path: Path, verify: bool = False) -> str | None:
    """None when the checkpoint is whole, else what is wrong. Sizes are always compared with the meta;
    `verify` re-hashes every file too (done once before resuming from it). Checkpoints written before
    ptflow recorded sizes only need their files present."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return f"{META} is missing or unreadable (torn write)"
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        return f"{META} has no step"
    state = (f"{SHARDED}/.metadata",) if (path / SHARDED).is_dir() else (WEIGHTS, "optimizer.pt")
    missing = [f for f in (*state, "scheduler.pt", "rng_state.pth") if not (path / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    recorded = meta.get("files", {})
    for name, expected in recorded.items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"{name} missing"
        if size != expected["size"]:
            return f"{name} has {size} bytes, expected {expected['size']}"
    if verify:
        digests = sha256_files([path / name for name in recorded])
        for name, expected in recorded.items():
            if digests[path / name] != expected["sha256"]:
                return f"{name} content changed (sha256 mismatch)"
    return None


def is_complete(path: Path) -> bool:
    return damage(path) is None


def newest_valid(folder: Path) -> Path | None:
    """The newest checkpoint whose files match its meta (re-hashed); damaged ones are named and skipped."""
    for step, path in reversed(list_checkpoints(folder)):
        problem = damage(path, verify=True)
        if problem is None:
            return path
        log.warning("checkpoint: skipping damaged checkpoint %s (%s); trying the previous one", path.name, problem)
    return None


def adopt_checkpoints(folder: Path, fingerprint: dict) -> Path | None:
    """Find resumable work by its fingerprint when this key's work folder holds no checkpoint.

    A run's key can change while its data, tokenizer and config do not (a stage format version
    bump, a library upgrade on the workers): the newest intact checkpoint in another work folder
    of the stage (`<key>.work` beside `folder`) whose fingerprint matches is moved here with that
    folder's log, so the run continues instead of starting over. Returns the adopted checkpoint.
    """
    if any(is_complete(path) for _, path in list_checkpoints(folder)):
        return None  # sizes only: the resume re-hashes the checkpoint it picks (newest_valid)
    found: list[tuple[int, Path]] = []
    for work in sorted(folder.parent.glob("*.work")):
        if work == folder:
            continue
        for step, path in reversed(list_checkpoints(work)):
            if is_complete(path) and _fingerprint_matches(path, fingerprint):
                found.append((step, path))
                break
    if not found:
        return None
    step, source = max(found)
    folder.mkdir(parents=True, exist_ok=True)
    for entry in source.parent.iterdir():  # its checkpoints and its log: the run continues where it stopped
        os.replace(entry, folder / entry.name)
    source.parent.rmdir()
    log.info("checkpoint: resuming from %s of %s (same data, tokenizer and config; its key changed: format "
             "version or library versions)", source.name, source.parent.name[:12])
    return folder / source.name


def fingerprint(config: dict, dataset_digest: str, tokenizer_digest: str, world: int) -> dict:
    """What a checkpoint must share with the run that resumes it.

    `train_config` and `world_size` name this exact run. `train_schedule` (the config without `LAYOUT_KEYS`) and
    `global_batch` (blocks per optimizer step) name every run that trains the same steps on the same batches:
    2 processes x micro-batch 4 continue 4 x 2 or 1 x 8, FSDP continues DDP (DCP re-shards the state).
    """
    train = {k: v for k, v in config["train"].items() if k not in LAYOUT_KEYS}
    blocks = config["train"]["per_device_train_batch_size"] * config["train"]["gradient_accumulation_steps"] * world
    return {"dataset": dataset_digest, "tokenizer": tokenizer_digest, "train_config": sha256_json(config)[:16],
            "world_size": world, "train_schedule": sha256_json({**config, "train": train})[:16],
            "global_batch": blocks}


def mismatches(found: dict, expected: dict) -> list[str]:
    """The fingerprint fields that keep a checkpoint from continuing this run (empty: it may)."""
    exact = ("dataset", "tokenizer", "train_config", "world_size")
    if all(found.get(k) == expected.get(k) for k in exact if k in expected):
        return []
    same_steps = ("dataset", "tokenizer", "train_schedule", "global_batch")
    if "train_schedule" in found and all(found.get(k) == expected.get(k) for k in same_steps):
        return []  # another split of the same steps (process count, micro-batch, accumulation, FSDP)
    keys = same_steps if "train_schedule" in found and "train_schedule" in expected else exact
    return [k for k in keys if found.get(k) != expected.get(k)]


def _fingerprint_matches(path: Path, fingerprint: dict) -> bool:
    try:
        found = json.loads((path / META).read_text()).get("fingerprint", {})
    except (OSError, ValueError):
        return False
    return not mismatches(found, fingerprint)


def check_fingerprint(path: Path, expected: dict) -> dict:
    """The checkpoint's metadata, or CheckpointError naming each field that differs (sizes checked; `newest_valid`
    has already re-hashed an automatically chosen checkpoint)."""
    problem = damage(path)
    if problem:
        raise CheckpointError(f"train.resume_from_checkpoint: {path} is not a complete ptflow checkpoint "
                              f"({problem}; needs {META}, {WEIGHTS} + optimizer.pt or {SHARDED}/, scheduler.pt, "
                              "rng_state.pth as written by ptflow)")
    meta = json.loads((path / META).read_text())
    found = meta.get("fingerprint", {})
    changed = [f"{k} (checkpoint {str(found.get(k))[:16]}, now {str(expected.get(k))[:16]})"
               for k in mismatches(found, expected)]
    if changed:
        why = f" ({WHY_BATCH})" if {"global_batch", "world_size"} & {c.split()[0] for c in changed} else ""
        raise CheckpointError(f"train.resume_from_checkpoint: {path} was made by a different run; changed: "
                              f"{', '.join(changed)}{why}. Set train.resume_from_checkpoint: false to start over.")
    return meta


def load_checkpoint(path: Path, model, optimizer, scheduler, load_states=None) -> None:
    """Restore a checkpoint. A sharded one is re-sharded onto the model as it is laid out now (FSDP over any
    number of ranks, or one process); `load_states(weights, optimizer_state)` puts a full one into an FSDP model."""
    if (path / SHARDED).is_dir():
        sharding.load_sharded(model, optimizer, path / SHARDED)
    else:
        load_full(path, model, optimizer, load_states)
    load_run_state(path, scheduler)


def load_full(path: Path, model, optimizer, load_states=None) -> None:
    state = load_file(path / WEIGHTS)
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise CheckpointError(f"{path}: weights {missing[:3]} do not match the model")
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if load_states is not None:
        load_states(state, optimizer_state)
    else:
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        optimizer.load_state_dict(optimizer_state)


def load_run_state(path: Path, scheduler) -> None:
    """The schedule's position and the RNG states of rank 0 when it saved."""
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng_state.pth", weights_only=False)  # our own file: python/numpy RNG tuples
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def rotate(folder: Path, keep: int | None) -> None:
    if not keep:
        return
    complete = [(s, p) for s, p in list_checkpoints(folder) if is_complete(p)]
    for _, path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
