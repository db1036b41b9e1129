"""Prefect's embedded API server (no PREFECT_API_URL), started by the CLI so that a stopped run takes it along.

Prefect starts its temporary server (`uvicorn ... prefect.server`) as a plain child: a Ctrl-C at
the terminal kills it at the same instant as the run, so the run cannot report its final state
(hundreds of lines of httpx.ConnectError, minutes to exit, flow runs left `Running`), and a
SIGTERM or kill -9 of `ptflow` leaves it running. Here the same server runs through
`ptflow.child`: in its own session (the terminal's Ctrl-C reaches only `ptflow`, which stops it
at exit, after the run's state is written) and ended by the kernel if `ptflow` is killed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import get_current_settings

from ptflow import child


class _ServerInOwnSession(SubprocessASGIServer):
    """Prefect's temporary server, started as a `ptflow.child` (own session, dies with its parent)."""

    def _run_uvicorn_command(self) -> subprocess.Popen:
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        return child.start("uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
                           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                           "--log-level", "error", "--lifespan", "on", env=env)

    def stop(self) -> None:
        """End the server (3 s to shut down cleanly, then killed) without Prefect's log line after ours."""
        if self.server_process is not None:
            child.end_group(self.server_process, grace=3.0)
            self.server_process = None
        super().stop()


def start_embedded_server() -> SubprocessASGIServer:
    """Start the temporary server now (Prefect then uses this one); only in embedded mode (`tasks.slots.is_embedded`).

    Prefect stops it at interpreter exit, after its log and event workers have drained.
    """
    server = _ServerInOwnSession()  # registers itself as Prefect's instance for the default port
    server.start()
    return server
