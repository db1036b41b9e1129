"""PyTorch's compile caches kept in the store, so a resumed or re-run train stage skips most of its compile.

torch.compile caches compiled graphs (Inductor's FX graph and AOTAutograd caches) and Triton kernels in
local temp folders by default; a GPU pod that restarts, or a worker that resumes another worker's run,
starts cold. Pointing those caches into `<store>/compile-cache/<torch>-<triton>-<device>/` keeps them with
the run's other artifacts. Inductor keys each entry by the graph, its inputs and the compile settings
itself, so one folder per (torch, triton, device kind) is safe to share between models and runs; the
folder name keeps caches of other versions and GPUs apart. A cache the user set (TORCHINDUCTOR_CACHE_DIR,
TRITON_CACHE_DIR) is left alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ptflow.store.stage import library_version

VARIABLES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def cache_folder(root: Path) -> Path:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    name = f"torch-{torch.__version__}-triton-{library_version('triton')}-{device}"
    return root / re.sub(r"[^A-Za-z0-9.+_-]+", "_", name)


@contextmanager
def compile_caches_in(root: Path) -> Iterator[Path]:
    """Set the compile cache variables (inherited by torchrun ranks) for the duration of a train stage."""
    folder = cache_folder(root)
    saved = {name: os.environ.get(name) for name in VARIABLES}
    for name, sub in VARIABLES.items():
        if not saved[name]:
            os.environ[name] = str(folder / sub)
    try:
        yield folder
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
