"""Typed errors. Each message names the file, key or line at fault and says how to fix it.

`PtflowError.transient` tells the orchestration layer whether a retry can help: config and
data problems never go away by retrying, so they fail at once.
"""

from __future__ import annotations


class PtflowError(Exception):
    """Base of every error ptflow raises on purpose; the CLI prints these without a traceback."""

    transient = False


class ConfigError(PtflowError):
    """The run config is invalid; `problems` lists every problem found, one line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) in the config:\n{lines}")


class DataError(PtflowError):
    """A dataset file, entry or column is missing or malformed."""


class ModelError(PtflowError):
    """The model or tokenizer cannot be loaded, or they do not fit together."""


class StoreError(PtflowError):
    """The artifact store cannot be written or holds an inconsistent entry."""


class CheckpointError(PtflowError):
    """A checkpoint cannot be resumed from (missing, torn or made by a different run)."""


class TrainingError(PtflowError):
    """Training diverged (NaN/inf) or cannot proceed."""


class HubError(PtflowError):
    """The Hugging Face Hub refused a request (auth, permissions, missing repo) or stayed unreachable."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class PreflightError(ConfigError):
    """The config is well-formed but does not fit the model, data or machine it names."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying can help: network trouble and Hub 5xx/429, never config, data or OOM errors."""
    if isinstance(exc, PtflowError):
        return exc.transient
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return isinstance(status, int) and (status >= 500 or status == 429)
