"""The deployment files, checked against their schemas (no Docker engine or cluster needed).

- prefect.yaml: entrypoints import, pools, schedules Prefect accepts, the train deployment the config names.
- infra/docker/compose.yaml: the Compose Specification's JSON schema (vendored by check-jsonschema), then
  what the stack needs (server on PostgreSQL with a matching API port, workers sharing /store, a GPU).
- infra/k8s/: every manifest strictly validated against Kubernetes' OpenAPI schemas (kubernetes-validate);
  the work pool's base job template through Prefect's own checks, then rendered and validated as a Job.
"""

from __future__ import annotations

import copy
import importlib
import importlib.resources
import json
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"


def load_yaml(*parts: str):
    return yaml.safe_load((ROOT.joinpath(*parts)).read_text())


def test_prefect_yaml_deployments_point_at_real_flows_and_pools():
    from prefect.client.schemas.schedules import CronSchedule

    from flows.deploy import work_pools
    from ptflow.config.schema import OrchestrationSection

    spec = load_yaml("prefect.yaml")
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly", "gpu"}
    for d in deployments.values():
        module, func = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), func)
        d["flow"] = flow.name
    nightly, gpu = deployments["nightly"], deployments["gpu"]
    assert (nightly["flow"], nightly["work_pool"]["name"]) == ("pretrain", "cpu")
    assert f"{gpu['flow']}/{gpu['name']}" == OrchestrationSection().train_deployment  # what gpu-pool placement calls
    assert gpu["work_pool"]["name"] == "gpu" and work_pools(ROOT) == ["cpu", "gpu"]
    [schedule] = nightly["schedules"]
    assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == "0 2 * * *"
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    config = ROOT / nightly["parameters"]["config_path"]
    from ptflow.config.loading import load_config

    assert load_config(config, nightly["parameters"]["overrides"]).orchestration.placement == "gpu-pool"
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory":
                             {"directory": "{{ $PTFLOW_PROJECT_DIR }}"}}]


def test_compose_file_follows_the_compose_spec_and_wires_the_stack():
    compose = load_yaml("infra", "docker", "compose.yaml")
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(compose)
    with pytest.raises(jsonschema.ValidationError):  # the schema does catch mistakes
        broken = copy.deepcopy(compose)
        broken["services"]["gpu-worker"]["deploy"]["resources"]["reservations"]["gpu"] = "all"
        jsonschema.validators.validator_for(schema)(schema).validate(broken)

    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "deploy", "cpu-worker", "gpu-worker"}
    server = services["prefect-server"]
    port = server["command"][server["command"].index("--port") + 1]
    assert server["environment"]["PREFECT_SERVER_API_PORT"] == port  # docs/prefect-verification.md
    assert server["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, pool in (("cpu-worker", "cpu"), ("gpu-worker", "gpu")):
        worker = services[name]
        assert worker["command"][-4:] == ["--pool", pool, "--type", "process"]
        assert worker["environment"]["PREFECT_API_URL"] == f"http://prefect-server:{port}/api"
        assert worker["environment"]["PTFLOW_HOME"] == "/store" and "store:/store" in worker["volumes"]
        assert worker["build"]["dockerfile"] == "infra/docker/Dockerfile.gpu"
        assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    [gpu] = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "deploy" not in services["cpu-worker"]
    assert services["deploy"]["command"][:2] == ["ptflow", "deploy"]


def test_gpu_dockerfile_pins_dependencies_and_starts_a_worker():
    text = (ROOT / "infra" / "docker" / "Dockerfile.gpu").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("nvidia/cuda:")
    assert "uv pip install -c constraints.txt" in text and "COPY pyproject.toml constraints.txt" in text
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["tini", "--"]
    assert json.loads(dict(instructions)["CMD"]) == ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
    for path in ("ptflow/", "tasks/", "flows/", "configs/", "prefect.yaml"):
        assert f"COPY {path}" in text


def test_kubernetes_manifests_are_valid_objects():
    docs = list(yaml.safe_load_all((ROOT / "infra" / "k8s" / "worker.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding", "Deployment"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    worker = docs[-1]["spec"]["template"]["spec"]
    assert worker["serviceAccountName"] == docs[1]["metadata"]["name"]
    assert worker["containers"][0]["args"][-4:] == ["--pool", "gpu", "--type", "kubernetes"]
    assert docs[0]["spec"]["accessModes"] == ["ReadWriteMany"]
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: a misspelt field is an error
        bad = copy.deepcopy(docs[-1])
        bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicey"] = "Always"
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def render_job(template: dict, **values) -> dict:
    """The Job the Kubernetes worker submits: Prefect's templating, then the worker's env/args conversion."""
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if v.get("default") is not None}
    config = apply_values(copy.deepcopy(template["job_configuration"]), {**defaults, **values})
    job = config["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["args"] = shlex.split(container["args"])  # prefect-kubernetes splits the command string
    container["env"] += [{"name": k, "value": v} for k, v in config["env"].items()]  # and appends the run's env
    return job


def test_kubernetes_work_pool_template_is_one_prefect_accepts_and_renders_a_valid_gpu_job():
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools import ValidationError, validate

    template = json.loads((ROOT / "infra" / "k8s" / "gpu-work-pool.json").read_text())
    validate_base_job_template(template)  # every {{ placeholder }} is a declared variable
    variables = template["variables"]
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    validate(defaults, variables, raise_on_error=True, preprocess=True, ignore_required=True,
             allow_none_with_default=True)
    with pytest.raises(ValidationError):
        validate({"gpu_count": 0}, variables, raise_on_error=True, preprocess=True, ignore_required=True)

    job = render_job(template, name="nightly-train", command="prefect flow-run execute",
                     env={"PREFECT_API_URL": "http://prefect:4200/api"}, gpu_count=8)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8  # the placeholder keeps its integer type
    assert {"name": "PTFLOW_HOME", "value": "/store"} in container["env"]
    assert {"name": "store", "mountPath": "/store"} in container["volumeMounts"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "ptflow-store"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    with pytest.raises(ValueError, match="undeclared variable"):
        broken = copy.deepcopy(template)
        broken["job_configuration"]["job_manifest"]["spec"]["parallelism"] = "{{ workers }}"
        validate_base_job_template(broken)
