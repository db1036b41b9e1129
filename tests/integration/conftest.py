"""Fixtures that run real processes: the ptflow CLI, and a Prefect server on PostgreSQL."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("PTFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def cli_env(tmp_path: Path, first_start: bool = False, **extra: str) -> dict[str, str]:
    """The CLI's environment: its own store and PREFECT_HOME. Without PREFECT_API_URL the CLI starts Prefect's
    embedded server on PREFECT_HOME's SQLite database, which gets a copy of an already migrated one unless the
    test is about a user's `first_start` (the migrations take ~25 s of every such run on a 2-core machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PTFLOW_"))}
    env.update(PTFLOW_HOME=str(tmp_path / "store"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1", **extra)
    if "PREFECT_API_URL" not in extra and not first_start:
        (tmp_path / "prefect").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated_prefect_db(), tmp_path / "prefect" / "prefect.db")
    return env


@functools.cache
def migrated_prefect_db() -> Path:
    """A SQLite database with every Prefect migration applied (`prefect server database upgrade`), made once."""
    home = Path(tempfile.mkdtemp(prefix="ptflow-test-prefect-db-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                          env={**env, "PREFECT_HOME": str(home)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and (home / "prefect.db").is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    return home / "prefect.db"


def run_cli(env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def psql(sql: str) -> None:
    subprocess.run(["psql", PG_URL + "/postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql], check=True,
                   capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a fresh PostgreSQL database; yields the API URL."""
    with prefect_server_on_postgres(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url


@contextmanager
def prefect_server_on_postgres(home: Path) -> Iterator[str]:
    """A server of one's own (a test module that must not see other modules' runs); yields the API URL."""
    db = f"ptflow_it_{uuid.uuid4().hex[:8]}"
    psql(f"CREATE DATABASE {db}")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_API_PORT=str(port),
               PREFECT_SERVER_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://{PG_URL.split('://', 1)[1]}/{db}",
               # a slot whose holder was killed is freed when its 60 s lease ends; the default 15 s sweep
               # would add up to 15 s to every re-run after a kill -9 in training
               PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="1")
    log = open(home / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
