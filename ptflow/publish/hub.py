"""Stage `publish`: push a run's outputs to the Hugging Face Hub in one commit.

    from ptflow.publish.hub import publish
    result = publish(cfg.output, output_dir, [model, evaluation, plots, card], run_name=cfg.run_name,
                     data_digest=dataset.digest, flow_run="pretrain/brave-fox (3f2c...)")

What goes up: the files the run's artifacts exported into the output folder (the weights, or
only the adapter for a LoRA run; tokenizer, trainer logs, results, plots, README.md), never the
`checkpoint-*` folders. The repo is created when missing (`hub_private_repo` sets its
visibility), then everything is sent as ONE `create_commit` whose message names the run and
the data manifest digest, so a Hub commit traces back to the exact data. (`upload_folder` is
not used: with hf_xet installed it may split a large folder into several commits.)

The token is HF_TOKEN when set, else `output.hub_token`, else the `hf auth login` token. Only
huggingface_hub sees it: no log line, result or exception text carries it (messages built from
Hub errors are scrubbed). Connection errors, timeouts, HTTP 5xx and 429 are retried with
exponential backoff (`RETRY_DELAYS_S`); 401/403/404 fail at once with the fix. `check_access`
is the CPU preflight (whoami plus namespace and role checks) that runs before training.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ptflow import __version__
from ptflow.config.schema import OutputSection
from ptflow.errors import HubError, is_transient
from ptflow.store.entries import Artifact, tree_files

log = logging.getLogger("ptflow.publish")

STAGE = "publish"
RETRY_DELAYS_S = (2.0, 4.0, 8.0, 16.0)
SKIP_PREFIXES = ("checkpoint-",)
TOKENS_URL = "https://huggingface.co/settings/tokens"
READ_ONLY_ORG_ROLES = {"read"}
TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
T = TypeVar("T")


@dataclass(frozen=True)
class PublishResult:
    """Where the run went: the repo, the commit, what was uploaded, how many Hub calls it took."""

    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    commit_message: str
    files: tuple[str, ...]
    hub_calls: int


def resolve_token(section: OutputSection) -> str | None:
    """HF_TOKEN wins over output.hub_token, which wins over the token saved by `hf auth login`."""
    env = os.environ.get("HF_TOKEN", "").strip()
    configured = section.hub_token.get_secret_value().strip() if section.hub_token is not None else ""
    if env:
        if configured:
            log.info("publish: using HF_TOKEN from the environment; output.hub_token is ignored")
        return env
    if configured:
        return configured
    from huggingface_hub import get_token

    return get_token()


def full_repo_id(name: str, whoami: dict) -> str:
    return name if "/" in name else f"{whoami.get('name')}/{name}"


def upload_files(artifacts: Sequence[Artifact | None], output_dir: Path) -> list[str]:
    """Relative paths of the files the artifacts exported into `output_dir` (no checkpoints, no manifests)."""
    files = set()
    for artifact in artifacts:
        if artifact is None:
            continue
        for src in tree_files(artifact.dir):
            rel = src.relative_to(artifact.dir).as_posix()
            if rel.startswith(SKIP_PREFIXES):
                continue
            if not (output_dir / rel).is_file():
                raise HubError(f"publish: {output_dir / rel} is missing from the output folder; re-run the flow "
                               "to export the run's files again before publishing")
            files.add(rel)
    return sorted(files)


def commit_message(run_name: str, data_digest: str, flow_run: str | None) -> str:
    run = f"{run_name}, flow run {flow_run}" if flow_run else run_name
    return f"ptflow run {run}: data manifest {data_digest[:16]}"


def commit_description(artifacts: Sequence[Artifact | None], data_digest: str, flow_run: str | None) -> str:
    by_stage = {a.stage: a for a in artifacts if a is not None}
    lines = [f"- data manifest digest: {data_digest}"]
    if flow_run:
        lines.append(f"- Prefect flow run: {flow_run}")
    if "train" in by_stage:
        lines.append(f"- model digest: {by_stage['train'].digest}")
    results = by_stage["evaluate"].stats if "evaluate" in by_stage else {}
    for key in ("eval_loss", "perplexity", "eval_tokens", "eval_set_digest"):
        if results.get(key) is not None:
            lines.append(f"- {key}: {results[key]}")
    return "Uploaded by ptflow.\n\n" + "\n".join(lines)


class _Hub:
    """HfApi calls with transient failures retried and the token scrubbed from every error message."""

    def __init__(self, token: str, retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
                 sleep: Callable[[float], None] = time.sleep):
        from huggingface_hub import HfApi

        # HF_ENDPOINT is re-read here (huggingface_hub reads it once at import) so a private Hub set later applies.
        self.api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token, library_name="ptflow",
                         library_version=__version__)
        self._token = token
        self.delays, self.sleep, self.calls = tuple(retry_delays_s), sleep, 0

    def call(self, what: str, fn: Callable[[], T], repo_id: str | None = None) -> T:
        for attempt, delay in enumerate((*self.delays, None), start=1):
            self.calls += 1
            try:
                return fn()
            except _hub_errors() as exc:
                transient = _is_transient(exc)
                if not transient or delay is None:
                    raise self._error(what, exc, transient, attempt, repo_id) from None
                log.warning("publish: %s failed (%s); retry %d of %d in %.0f s", what, self.reason(exc), attempt,
                            len(self.delays), delay)
            self.sleep(delay)

    def scrub(self, text: str) -> str:
        return TOKEN_LIKE.sub("<token>", text.replace(self._token, "<token>"))

    def reason(self, exc: BaseException) -> str:
        cause = _cause(exc)
        status = _status(cause)
        lines = str(cause).splitlines()
        detail = getattr(cause, "server_message", None) or (lines[0] if lines else "")
        text = f"HTTP {status}: {detail}" if status else f"{type(cause).__name__}: {detail}"
        return self.scrub(text.strip().rstrip(":"))[:300]

    def _error(self, what: str, exc: BaseException, transient: bool, attempts: int, repo_id: str | None) -> HubError:
        from huggingface_hub.errors import OfflineModeIsEnabled

        status, target = _status(_cause(exc)), repo_id or "the repo"
        if isinstance(_cause(exc), OfflineModeIsEnabled):
            msg = "publish: HF_HUB_OFFLINE=1 forbids contacting the Hub; unset it, or set output.push_to_hub: false"
        elif transient:
            msg = (f"publish: {what} failed {attempts} times ({self.reason(exc)}); the Hub at {self.api.endpoint} is "
                   "unreachable or overloaded. Re-run the flow later: finished stages are cached, only publishing is redone")
        elif status == 401:
            msg = (f"publish: the Hub rejected the token ({what}: HTTP 401). Set HF_TOKEN (or output.hub_token) to a "
                   f"valid token with write access from {TOKENS_URL}")
        elif status == 403:
            msg = (f"publish: the token may not write to {target} ({what}: HTTP 403). Use a write token (or a "
                   f"fine-grained one with write access to that namespace) from {TOKENS_URL}, or change "
                   "output.hub_model_id")
        elif status == 404:
            msg = (f"publish: {target} was not found ({what}: HTTP 404). Check output.hub_model_id; a private repo "
                   "of another account looks missing to your token")
        else:
            msg = f"publish: {what} failed ({self.reason(exc)})"
        return HubError(self.scrub(msg), transient=transient)


def _hub_errors() -> tuple[type[BaseException], ...]:
    import httpx2  # huggingface_hub's HTTP client: HTTP status errors and transport (network) errors

    # OSError: offline mode, no token; ValueError: the Hub refused README metadata or answered malformed;
    # RuntimeError: huggingface_hub wraps a failed LFS upload in it (the HTTP error is its __cause__).
    return httpx2.HTTPError, OSError, ValueError, RuntimeError


def _cause(exc: BaseException) -> BaseException:
    return exc.__cause__ if isinstance(exc, RuntimeError) and exc.__cause__ is not None else exc


def _status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _is_transient(exc: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    cause = _cause(exc)
    if isinstance(cause, OfflineModeIsEnabled):  # a ConnectionError that no retry fixes
        return False
    return isinstance(cause, httpx2.TransportError) or is_transient(cause)


def check_access(section: OutputSection, run_name: str) -> list[str]:
    """Preflight for push_to_hub: a token, accepted by the Hub, allowed to write to the target namespace."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return ["output.push_to_hub: HF_HUB_OFFLINE=1 forbids contacting the Hub; unset it, or set "
                "output.push_to_hub: false"]
    token = resolve_token(section)
    if not token:
        return [f"output.push_to_hub: no Hub token found; export HF_TOKEN=<a write token from {TOKENS_URL}> "
                "(or set output.hub_token in the config file)"]
    hub = _Hub(token, retry_delays_s=(1.0, 2.0))
    try:
        whoami = hub.call("whoami", hub.api.whoami)
    except HubError as exc:
        return [f"output.push_to_hub: {exc}"]
    return access_problems(whoami, full_repo_id(section.hub_model_id or run_name, whoami))


def access_problems(whoami: dict, repo_id: str) -> list[str]:
    """What the whoami answer says about writing to `repo_id` (creating it if needed)."""
    user, namespace = whoami.get("name"), repo_id.split("/")[0]
    orgs = {org.get("name"): org.get("roleInOrg") for org in whoami.get("orgs") or []}
    token = (whoami.get("auth") or {}).get("accessToken") or {}
    problems = []
    if namespace != user and namespace not in orgs:
        problems.append(f"output.hub_model_id: {repo_id!r}: the token belongs to {user!r}, who is not a member of "
                        f"{namespace!r} (member of: {', '.join(sorted(orgs)) or 'no organization'}); push to "
                        f"{user}/{repo_id.split('/')[-1]} or use a token of a member")
    elif namespace in orgs and orgs[namespace] in READ_ONLY_ORG_ROLES:
        problems.append(f"output.hub_model_id: {repo_id!r}: {user!r} has the read role in {namespace!r}; ask an "
                        "admin for write access or push to your own namespace")
    if token.get("role") == "read":
        problems.append(f"output.push_to_hub: the token is read-only; create one with write access at {TOKENS_URL}")
    elif token.get("role") == "fineGrained":
        log.warning("publish: fine-grained token: make sure it may write to %s (checked only when pushing)", repo_id)
    return problems


def publish(section: OutputSection, output_dir: Path, artifacts: Sequence[Artifact | None], *, run_name: str,
            data_digest: str, flow_run: str | None = None, retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
            sleep: Callable[[float], None] = time.sleep) -> PublishResult:
    """Create the repo if missing and upload the run's exported files in one commit."""
    from huggingface_hub import CommitOperationAdd

    output_dir = Path(output_dir)
    files = upload_files(artifacts, output_dir)
    if not files:
        raise HubError(f"publish: the run exported no files to {output_dir}; nothing to upload")
    token = resolve_token(section)
    if not token:
        raise HubError(f"publish: no Hub token found; export HF_TOKEN=<a write token from {TOKENS_URL}> "
                       "(or set output.hub_token in the config file)")
    hub = _Hub(token, retry_delays_s, sleep)
    name = section.hub_model_id or run_name
    # whoami (rate-limited on the Hub, and already asked by the preflight) only to learn a missing namespace.
    repo_id = name if "/" in name else full_repo_id(name, hub.call("whoami", hub.api.whoami))
    repo_url = hub.call("create repo", lambda: hub.api.create_repo(repo_id, private=section.hub_private_repo,
                                                                   exist_ok=True), repo_id)
    message = commit_message(run_name, data_digest, flow_run)
    description = commit_description(artifacts, data_digest, flow_run)
    log.info("publish: uploading %d files from %s to %s in one commit", len(files), output_dir, repo_id)

    def commit():
        # Operations are rebuilt per attempt: huggingface_hub marks them used once committed.
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(output_dir / rel)) for rel in files]
        return hub.api.create_commit(repo_id, operations=operations, commit_message=message,
                                     commit_description=description)

    info = hub.call("commit", commit, repo_id)
    log.info("publish: %s -> %s", repo_id, info.commit_url)
    return PublishResult(repo_id, str(repo_url), info.commit_url, info.oid, message, tuple(files), hub.calls)
