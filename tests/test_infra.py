"""The deployment files apply as they are: every manifest parses, and the fields that matter hold
(image tag, entrypoints and their configs, GPU limits, schedules, concurrency, secrets by reference,
least privilege); the `ray up` file validates against the schema Ray ships. hadolint lints the
Dockerfile in `make lint`."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

import pipeline
from pipeline.cli import build_parser
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
SECRET_NAMES = re.compile(r"KEY|SECRET|PASSWORD|TOKEN", re.IGNORECASE)


def documents() -> list[dict]:
    """Every Kubernetes object in infra/k8s, the RayJob template a CronJob creates included."""
    docs = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    templates = [
        yaml.safe_load(text)
        for doc in docs
        if doc["kind"] == "ConfigMap"
        for name, text in doc["data"].items()
        if name == "rayjob.yaml"
    ]
    return docs + templates


def of_kind(kind: str) -> list[dict]:
    return [doc for doc in documents() if doc["kind"] == kind]


def ray_jobs() -> list[dict]:
    """(RayJob spec) of every RayJob, RayCronJob template and CronJob-created RayJob."""
    return [d["spec"] for d in of_kind("RayJob")] + [d["spec"]["jobTemplate"] for d in of_kind("RayCronJob")]


def cluster_specs() -> list[dict]:
    return [d["spec"] for d in of_kind("RayCluster")] + [job["rayClusterSpec"] for job in ray_jobs()]


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def dockerfile_workdir() -> str:
    return re.search(r"^WORKDIR (\S+)", (ROOT / "infra" / "Dockerfile").read_text(), re.MULTILINE).group(1)


def test_every_manifest_parses_and_names_what_it_is():
    kinds = {doc["kind"] for doc in documents()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap", "Role", "ServiceAccount"} <= kinds
    for path in K8S.glob("*.yaml"):
        assert "kubectl apply -f infra/k8s/" in path.read_text().split("apiVersion")[0], (
            f"{path.name}: no apply command"
        )


def test_images_are_the_package_version_built_by_the_dockerfile():
    images = [c["image"] for cluster in cluster_specs() for c in containers(cluster)]
    images.append(yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text())["docker"]["image"])
    assert images and all(image.endswith(f"/neobert-pipeline:{pipeline.__version__}") for image in images), images
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert f"neobert-pipeline:{pipeline.__version__}" in dockerfile  # the documented build command's tag
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.MULTILINE).group(1)
    assert ":" in base and not base.endswith(":latest")  # pinned by tag
    assert re.search(r"^USER (?!root|0\b)\S+", dockerfile, re.MULTILINE)  # not root
    assert "--constraint constraints.txt" in dockerfile  # the versions CI tests


def test_entrypoints_exist_and_their_flags_and_configs_load():
    mounted = {}
    for doc in of_kind("ConfigMap"):
        if doc["metadata"]["name"] == "neobert-job-config":
            mounted = doc["data"]
    for job in ray_jobs():
        python, script, *args = shlex.split(job["entrypoint"])
        assert python == "python" and script.startswith(dockerfile_workdir() + "/")
        assert (ROOT / script.removeprefix(dockerfile_workdir() + "/")).is_file(), script
        head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mount = next(m for c in head["containers"] for m in c["volumeMounts"] if m["name"] == "job-config")
        config_path = args[args.index("--config") + 1]
        assert config_path.startswith(mount["mountPath"] + "/")
        config = load_config_text(mounted[config_path.rsplit("/", 1)[1]])
        assert config.device == "cuda" and config.actors.gpus_per_actor == 1
        sync_flags = {"--sync-to", "--sync-table"}
        embed_args = [
            a for i, a in enumerate(args) if a not in sync_flags and (i == 0 or args[i - 1] not in sync_flags)
        ]
        build_parser().parse_args(["embed", *embed_args])  # every flag is one embed takes
        if script.endswith("refresh.py"):
            url = args[args.index("--sync-to") + 1]
            assert re.match(r"^postgresql://[^:@/]+@", url), "no password in the sync URL"
        assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1  # retried, and resumes


def load_config_text(text: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_config(f.name, {})


def test_gpu_workers_have_one_gpu_and_the_head_does_no_work():
    for cluster in cluster_specs():
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
        for container in gpu["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert gpu["minReplicas"] <= gpu["maxReplicas"]
        assert any(g["groupName"] == "cpu" for g in cluster["workerGroupSpecs"])


@pytest.mark.parametrize("kind", ["RayCronJob", "CronJob"])
def test_nightly_schedules_are_valid_cron_and_do_not_overlap(kind):
    (schedule,) = of_kind(kind)
    assert valid_cron(schedule["spec"]["schedule"]), schedule["spec"]["schedule"]
    if kind == "CronJob":
        assert schedule["spec"]["concurrencyPolicy"] == "Forbid"
    else:  # KubeRay's RayCronJob spec has no concurrencyPolicy: the writer lease keeps runs apart
        assert "concurrencyPolicy" not in schedule["spec"]
        assert "--wait-for-lease" in schedule["spec"]["jobTemplate"]["entrypoint"]


def valid_cron(expression: str) -> bool:
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    fields = expression.split()
    if len(fields) != 5:
        return False
    for field, (low, high) in zip(fields, ranges, strict=True):
        for item in field.split(","):
            base, _, step = item.partition("/")
            if step and not step.isdigit():
                return False
            if base == "*":
                continue
            bounds = base.split("-")
            if not all(b.isdigit() and low <= int(b) <= high for b in bounds) or len(bounds) > 2:
                return False
    return True


def test_secrets_are_referenced_never_written_in_a_manifest():
    for doc in documents():
        text = json.dumps(doc)
        assert "AKIA" not in text and "password=" not in text.lower()
    envs = [env for cluster in cluster_specs() for c in containers(cluster) for env in c.get("env", [])]
    secret_envs = [env for env in envs if SECRET_NAMES.search(env["name"])]
    assert secret_envs and all("value" not in env and env["valueFrom"]["secretKeyRef"] for env in secret_envs)


def test_the_scheduler_may_only_create_and_read_rayjobs():
    (role,) = of_kind("Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]
    (cron,) = of_kind("CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == role["metadata"]["name"] and pod["securityContext"]["runAsNonRoot"]


def test_the_ray_up_file_validates_against_rays_cluster_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert "setup_commands" not in config  # the image holds everything
    broken = {**config, "available_node_types": {"head": {"node_config": {}}}}
    with pytest.raises(jsonschema.ValidationError):  # the schema is really checked
        jsonschema.validate(broken, schema)
