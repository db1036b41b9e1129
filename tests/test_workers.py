"""The tokenizer worker pool: workers start without re-running the parent's main module."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_workers_do_not_run_the_parents_main_module(tmp_path):
    runs = tmp_path / "main-runs.txt"
    script = tmp_path / "heavy_main.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from concurrent.futures import ThreadPoolExecutor
        sys.path.insert(0, {str(ROOT)!r})
        with open({str(runs)!r}, "a") as f:  # stands for a heavy main module's imports (prefect.engine)
            f.write(f"{{os.getpid()}}\\n")

        from pid_helper import pid_of
        from ptflow.data.workers import WorkerPool, start_early

        if __name__ == "__main__":
            start_early()
            pool = WorkerPool(2, dict, ())
            with ThreadPoolExecutor(4) as threads:  # submitted from several threads at once
                futures = list(threads.map(lambda i: pool.submit(pid_of, i), range(8)))
            pids = {{future.result() for future in futures}}
            pool.close()
            assert pids and os.getpid() not in pids, pids
            assert __spec__ is None and __file__ == {str(script)!r}  # restored once the workers started
            print("ok")
    """))
    (tmp_path / "pid_helper.py").write_text("import os\n\n\ndef pid_of(state, item):\n    return os.getpid()\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert len(runs.read_text().splitlines()) == 1  # the parent ran its main module; no worker did
