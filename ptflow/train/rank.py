"""What each torchrun rank runs: read the launch spec, train, leave stats or the error for the parent.

    python -m ptflow.train.rank SPEC.json     # started by ptflow.train.launch, not by hand
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from ptflow.config.schema import ModelSection, TrainSection
from ptflow.errors import PtflowError
from ptflow.store.entries import Artifact
from ptflow.train.launch import ERROR, RANK_LOG, STATS, RankLogFormatter
from ptflow.train.loop import run_training


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["folder"])
    rank0 = os.environ.get("RANK", "0") == "0"
    # warnings of every rank on stderr (torchrun's output); rank 0's progress (model built, resumed from, checkpoint
    # saved) also into a file the launching process relays to its own loggers, so it reaches the Prefect run's logs
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s rank {os.environ.get('RANK', '0')} %(name)s %(message)s", datefmt="%H:%M:%S")
    if rank0:
        relayed = logging.FileHandler(folder / RANK_LOG)
        relayed.setFormatter(RankLogFormatter())
        ptflow_log = logging.getLogger("ptflow")
        ptflow_log.setLevel(logging.INFO)
        ptflow_log.addHandler(relayed)
        ptflow_log.propagate = False  # not twice: the parent re-logs these lines (and prints them where it logs)
    try:
        stats = run_training(folder, ModelSection(**spec["model"]), TrainSection(**spec["train"]),
                             Artifact(**spec["tokenizer"]), Artifact(**spec["dataset"]), spec["seed"],
                             spec["fingerprint"], eval_batch_size=spec.get("eval_batch_size"))
    except PtflowError as exc:
        if rank0:
            (folder / ERROR).write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        print(f"ptflow: error: {exc}", file=sys.stderr)
        return 2
    if rank0:
        (folder / STATS).write_text(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
