"""`ptflow deploy`: create the work pools that prefect.yaml names, then apply its deployments.

    PREFECT_API_URL=http://prefect:4200/api ptflow deploy                 # process pools cpu + gpu
    ptflow deploy --pool-type gpu=kubernetes                              # gpu pool runs Kubernetes jobs
    ptflow deploy --dry-run                                               # print the prefect commands

It runs the `prefect` CLI in a subprocess (ptflow itself never imports Prefect): for each pool
in prefect.yaml that the server does not have, `prefect work-pool create NAME --type TYPE`
(a kubernetes pool gets infra/k8s/gpu-work-pool.json as its base job template), then
`prefect --no-prompt deploy --all` from the project folder. Existing pools are left as they are.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from ptflow.errors import PtflowError

K8S_TEMPLATE = Path("infra") / "k8s" / "gpu-work-pool.json"
POOL_TYPES = ("process", "kubernetes", "docker")


class DeployError(PtflowError):
    """prefect.yaml is missing or malformed, or the Prefect CLI refused a step."""


def work_pools(project: Path) -> list[str]:
    """The work pool names prefect.yaml's deployments use, in order of first use."""
    spec_path = project / "prefect.yaml"
    if not spec_path.is_file():
        raise DeployError(f"{spec_path} not found: run ptflow deploy from the project folder (the one with "
                          "prefect.yaml), or pass --project-dir")
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
    pools = []
    for i, deployment in enumerate(spec.get("deployments") or []):
        name = ((deployment or {}).get("work_pool") or {}).get("name")
        if not name:
            raise DeployError(f"{spec_path}: deployments[{i}] ({deployment.get('name')!r}) has no work_pool.name")
        if name not in pools:
            pools.append(name)
    if not pools:
        raise DeployError(f"{spec_path}: no deployments to apply")
    return pools


def parse_pool_types(items: list[str], pools: list[str]) -> dict[str, str]:
    types = {}
    for item in items:
        pool, sep, kind = item.partition("=")
        if not sep or pool not in pools or kind not in POOL_TYPES:
            raise DeployError(f"--pool-type {item!r}: expected POOL=TYPE with POOL one of {', '.join(pools)} and "
                              f"TYPE one of {', '.join(POOL_TYPES)}, e.g. --pool-type gpu=kubernetes")
        types[pool] = kind
    return types


def deploy(project_dir: str = ".", pool_types: list[str] | None = None, code_dir: str | None = None,
           dry_run: bool = False) -> int:
    project = Path(project_dir).resolve()
    pools = work_pools(project)
    types = parse_pool_types(pool_types or [], pools)
    env = {**os.environ, "PTFLOW_PROJECT_DIR": str(Path(code_dir).resolve() if code_dir else project)}
    prefect = [sys.executable, "-m", "prefect"]
    for pool in pools:
        kind = types.get(pool, "process")
        create = [*prefect, "work-pool", "create", pool, "--type", kind]
        if kind == "kubernetes":
            create += ["--base-job-template", str(project / K8S_TEMPLATE)]
        if dry_run:
            print(shlex.join(create))
        elif _quiet([*prefect, "work-pool", "inspect", pool], env, project).returncode == 0:
            print(f"ptflow: work pool {pool!r} exists; left as it is")
        else:
            _check(create, env, project)
    apply = [*prefect, "--no-prompt", "deploy", "--all"]
    if dry_run:
        print(f"PTFLOW_PROJECT_DIR={shlex.quote(env['PTFLOW_PROJECT_DIR'])} {shlex.join(apply)}")
        return 0
    _check(apply, env, project)
    print(f"ptflow: deployments applied; start workers with `prefect worker start --pool NAME` for {', '.join(pools)}")
    return 0


def _quiet(command: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _check(command: list[str], env: dict, cwd: Path) -> None:
    result = _quiet(command, env, cwd)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        raise DeployError(f"`{shlex.join(command[2:])}` failed (exit {result.returncode}):\n"
                          f"{(result.stderr or result.stdout)[-2000:]}\nIs PREFECT_API_URL set to your server "
                          "(e.g. http://127.0.0.1:4200/api)?")
