"""The deployment files agree with the service they deploy.

Probe paths, ports, environment variable names and the autoscaling metric are read from the service's code (its
settings dataclass, its OpenAPI routes, its metrics registry), so renaming any of them without updating the
Dockerfile, the compose file or the Kubernetes manifests fails here. No Docker engine runs on the development
machines, so the image's start command and health check are run here, outside a container, with the image's
environment.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings
from tests.support.server import free_port

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
CASE = ROOT / "tests" / "fixtures" / "reference" / "case_a"

SETTINGS = {f.metadata["env"]: f for f in fields(Settings)}
DEFAULTS = {env: f.default for env, f in SETTINGS.items()}
PORT = DEFAULTS["ANYDOOR_PORT"]
READY, LIVE, METRICS = "/health/ready", "/health/live", "/metrics"
QUEUE_METRIC = next(iter(Metrics().queue_depth.describe())).name


@pytest.fixture(scope="module")
def get_routes() -> set[str]:
    """The GET paths the real app serves (from its OpenAPI document)."""
    paths = create_app(Settings(demo=True)).openapi()["paths"]
    routes = {path for path, ops in paths.items() if "get" in ops}
    assert {READY, LIVE, METRICS, "/health-check"} <= routes
    return routes


def check_env(env: dict[str, str | None] | dict[str, str], where: str) -> None:
    """Every ANYDOOR_* name is a real setting and its value is one the service accepts."""
    unknown = sorted(name for name in env if name.startswith("ANYDOOR_") and name not in SETTINGS)
    assert unknown == [], f"{where}: not settings of the service: {unknown}"
    for name, value in env.items():
        if name in SETTINGS and value is not None and not value.startswith("${"):
            SETTINGS[name].metadata["parse"](value)  # raises ValueError on a value the service rejects


def shutdown_budget(env: dict[str, str | None] | dict[str, str]) -> float:
    """The longest a clean shutdown takes: drain delay + grace, then uvicorn's backstop (service/cli.py)."""

    def value(name: str) -> float:
        return float(env.get(name) or str(DEFAULTS[name]))

    return math.ceil(value("ANYDOOR_SHUTDOWN_DELAY_S") + value("ANYDOOR_SHUTDOWN_GRACE_S") + 15)


# --- Kubernetes ----------------------------------------------------------------------------------------------


def load_k8s(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text())


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    doc = load_k8s("deployment.yaml")
    assert doc["kind"] == "Deployment"
    return doc


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def k8s_env(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_kustomization_lists_every_manifest_it_needs() -> None:
    kustomization = load_k8s("kustomization.yaml")
    for name in kustomization["resources"]:
        assert (K8S / name).is_file(), name
    assert {"deployment.yaml", "service.yaml", "hpa.yaml"} <= set(kustomization["resources"])


def test_deployment_probes_ports_and_environment_match_the_service(
    deployment: dict[str, Any], get_routes: set[str]
) -> None:
    container = container_of(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = k8s_env(container)
    check_env(env, "deployment.yaml")
    assert env["ANYDOOR_PORT"] == str(ports["http"]) == str(PORT)
    assert env["ANYDOOR_HOST"] == "0.0.0.0"

    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == READY
    assert probes["livenessProbe"]["path"] == LIVE
    assert probes["startupProbe"]["path"] == LIVE
    for probe in probes.values():
        assert probe["path"] in get_routes
        assert ports.get(probe["port"], probe["port"]) == PORT

    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == PORT and annotations["prometheus.io/path"] == METRICS


def test_termination_grace_covers_the_service_shutdown(deployment: dict[str, Any]) -> None:
    env = k8s_env(container_of(deployment))
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Long enough that the kubelet never kills a draining replica, and not so long that a hung one lingers.
    assert shutdown_budget(env) <= grace <= shutdown_budget(env) + 30


def test_weights_volume_holds_the_configured_weights(deployment: dict[str, Any]) -> None:
    container = container_of(deployment)
    env = k8s_env(container)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    weights_dir = str(Path(env["ANYDOOR_WEIGHTS"] or "").parent)
    assert mounts[weights_dir]["readOnly"] is True
    assert env["ANYDOOR_CACHE_DIR"] in mounts
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts[weights_dir]["name"]]["persistentVolumeClaim"]["claimName"]
    assert load_k8s("weights-pvc.yaml")["metadata"]["name"] == claim
    job = load_k8s("weights-job.yaml")["spec"]["template"]["spec"]
    assert job["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    command = job["containers"][0]["command"]
    assert command[:3] == ["anydoor", "weights", "download"] and "--sha256" in command
    assert command[command.index("--dest") + 1] == job["containers"][0]["volumeMounts"][0]["mountPath"]


# Files under deploy/kubernetes/ that are not Kubernetes API objects: kustomize's own file, a Helm values file and
# a Prometheus scrape-config fragment. Everything else must validate against the Kubernetes schemas.
NOT_API_OBJECTS = {"kustomization.yaml", "prometheus-adapter-values.yaml", "prometheus-scrape-config.yaml"}
# The oldest version the Indexed Job needs (backoffLimitPerIndex and FailIndex are on by default from 1.29; 1.30
# is the oldest still in common support) and the newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.y*ml")) if path.name not in NOT_API_OBJECTS
            for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_kubernetes_manifest_validates_against_the_schemas() -> None:
    """Offline: kubernetes-validate bundles the API's JSON schemas. Strict: an unknown or misspelt field fails."""
    import kubernetes_validate

    documents = k8s_documents()
    assert {name for name, _ in documents} >= {"deployment.yaml", "batch-job.yaml", "batch-merge-job.yaml"}
    for version in K8S_VERSIONS:
        for name, doc in documents:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name} (Kubernetes {version}): {exc.message} at {'.'.join(map(str, exc.path))}")
    for path in K8S.glob("*.y*ml"):  # the exceptions really are not API objects
        if path.name in NOT_API_OBJECTS and path.name != "kustomization.yaml":
            docs = list(yaml.safe_load_all(path.read_text()))
            assert all(not isinstance(d, dict) or "apiVersion" not in d for d in docs), path.name
    bad = json.loads(json.dumps(load_k8s("batch-job.yaml")))
    bad["spec"]["completionsMode"] = bad["spec"].pop("completionMode")  # a typo is caught, not ignored
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in a container's command."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def test_batch_job_runs_one_shard_per_index() -> None:
    from anydoor_batch.manifest import Shard
    from service.cli import build_parser

    job = load_k8s("batch-job.yaml")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["backoffLimitPerIndex"] >= 1
    assert 1 <= spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # backoffLimitPerIndex needs it
    (container,) = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    index_ref = next(e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX")["valueFrom"]["fieldRef"]
    assert index_ref["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert int(env["SHARDS"] or 0) == spec["completions"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    outputs = set()
    for index in range(spec["completions"]):
        command = [_expand(arg, {"JOB_COMPLETION_INDEX": str(index), "SHARDS": env["SHARDS"] or ""})
                   for arg in container["command"]]
        assert command[:2] == ["anydoor", "batch"]
        args = build_parser().parse_args(command[1:])  # the real command line parser
        assert args.shard == Shard(index, spec["completions"])
        for path in (args.manifest, args.output, Path(args.weights)):
            assert any(path.is_relative_to(mount) for mount in mounts), f"{path} is on a volume"
        outputs.add(args.output)
    assert len(outputs) == spec["completions"], "one output directory per shard"
    assert volumes[mounts["/data"]] == load_k8s("batch-data-pvc.yaml")["metadata"]["name"]
    assert volumes[mounts["/weights"]] == load_k8s("weights-pvc.yaml")["metadata"]["name"]
    assert "ReadWriteMany" in load_k8s("batch-data-pvc.yaml")["spec"]["accessModes"]

    merge = load_k8s("batch-merge-job.yaml")["spec"]["template"]["spec"]
    (merger,) = merge["containers"]
    script = shlex.split(merger["command"][-1])
    assert script[:3] == ["exec", "anydoor", "merge"]
    shard_dirs = [str(o) for o in sorted(outputs)]
    merged = build_parser().parse_args([a for arg in script[2:] for a in (shard_dirs if "*" in arg else [arg])])
    assert [str(p) for p in merged.inputs] == shard_dirs and str(merged.output).startswith("/data/")
    assert merge["volumes"][0]["persistentVolumeClaim"]["claimName"] == volumes[mounts["/data"]]


def test_service_routes_to_the_container_port(deployment: dict[str, Any]) -> None:
    service = load_k8s("service.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    names = {p["name"] for p in container_of(deployment)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names


def test_hpa_scales_the_deployment_on_the_queue_depth_metric(deployment: dict[str, Any]) -> None:
    hpa = load_k8s("hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == QUEUE_METRIC
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    # The adapter serves that name, built from the series the service exports, per namespace and pod ...
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert rule["seriesQuery"].startswith(QUEUE_METRIC + "{") and rule["name"]["as"] == QUEUE_METRIC
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # ... and the scrape job attaches exactly those labels.
    (job,) = yaml.safe_load((K8S / "prometheus-scrape-config.yaml").read_text())
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "__metrics_path__", "__address__"} <= targets


# --- Docker Compose ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str | None]:
    env: dict[str, str | None] = {}
    for item in service["environment"]:
        name, has_value, value = item.partition("=")
        # ${NAME:-default} -> default: the value the container gets when the shell leaves NAME unset.
        m = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
        # A bare NAME passes the shell's value through, or nothing: the service's default applies.
        env[name] = (m.group(1) if m else value) if has_value else None
    return env


def container_path(volume: str) -> str:
    """``SOURCE:TARGET[:MODE]`` -> TARGET; SOURCE may hold colons of its own (``${DIR:-./weights}``)."""
    parts = volume.rsplit(":", 2)
    return parts[1] if len(parts) == 3 and parts[2] in ("ro", "rw") else parts[-1]


def test_compose_matches_the_service(compose: dict[str, Any], get_routes: set[str]) -> None:
    service = compose["services"]["anydoor"]
    env = compose_env(service)
    check_env(env, "docker-compose.yml")
    assert [p.rsplit(":", 1)[1] for p in service["ports"]] == [str(PORT)]
    assert READY in get_routes and READY in " ".join(service["healthcheck"]["test"])
    assert service["healthcheck"]["test"][1:] == dockerfile_healthcheck()
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    mounts = {container_path(v): v for v in service["volumes"]}
    assert str(Path(env["ANYDOOR_WEIGHTS"] or "").parent) in mounts
    assert mounts["/cache"] and dockerfile_env()["ANYDOOR_CACHE_DIR"] == "/cache"
    assert float(service["stop_grace_period"].removesuffix("s")) >= shutdown_budget(env)


def test_prometheus_example_scrapes_the_metrics_route(compose: dict[str, Any], get_routes: set[str]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == METRICS and METRICS in get_routes
    assert job["static_configs"][0]["targets"] == [f"anydoor:{PORT}"]
    assert "anydoor" in compose["services"]


# --- Dockerfile ----------------------------------------------------------------------------------------------


@functools.cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def instructions(name: str) -> list[str]:
    return [args for inst, args in dockerfile() if inst == name]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            name, _, value = item.partition("=")
            env[name] = value
    return env


def dockerfile_healthcheck() -> list[str]:
    (args,) = instructions("HEALTHCHECK")
    return list(json.loads(args[args.index("CMD") + 3 :]))


def dockerfile_cmd() -> list[str]:
    (args,) = instructions("CMD")
    return list(json.loads(args))


def test_dockerfile_matches_the_service(get_routes: set[str]) -> None:
    env = dockerfile_env()
    check_env(env, "Dockerfile")
    assert instructions("EXPOSE") == [str(PORT)] and env["ANYDOOR_PORT"] == str(PORT)
    assert env["ANYDOOR_HOST"] == "0.0.0.0"
    assert READY in " ".join(dockerfile_healthcheck()) and READY in get_routes
    (base,) = [a for a in instructions("ARG") if a.startswith("BASE_IMAGE=")]
    assert re.fullmatch(r"BASE_IMAGE=nvidia/cuda:12\.[\d.]+-(cudnn-)?runtime-ubuntu\d+\.\d+", base)
    (user,) = instructions("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert env["ANYDOOR_WEIGHTS"].startswith("/weights/")


def test_dockerfile_installs_with_the_ci_script() -> None:
    """The image's only install step is scripts/setup.sh, the script .ci/run uses; only ANYDOOR_TORCH=cuda differs."""
    installs = [a for a in instructions("RUN") if "pip" in a or "setup.sh" in a]
    assert len(installs) == 1 and "bash scripts/setup.sh" in installs[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^bash scripts/setup\.sh --test$", ci, re.M)
    # The image's torch is CI's version (setup.sh's TORCH_VERSION; no override by default), in the CUDA build: the
    # build has no GPU for the script to detect.
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r'^TORCH_VERSION="[\d.]+"$', setup, re.M)
    assert "ANYDOOR_TORCH=cuda " in installs[0] and 'TORCH_SPEC=""' in instructions("ARG")
    assert "ANYDOOR_TORCH" not in ci


def test_one_cuda_version_everywhere() -> None:
    """The Docker base image, Cog's image, setup.sh's torch index and the docs name the same CUDA version."""
    (base,) = [a for a in instructions("ARG") if a.startswith("BASE_IMAGE=")]
    m = re.fullmatch(r"BASE_IMAGE=nvidia/cuda:(\d+\.\d+)\.\d+-\S+", base)
    assert m, base
    version = m.group(1)
    assert str(yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]["cuda"]) == version
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.findall(r'^CUDA_VERSION="([\d.]+)"$', setup, re.M) == [version]
    assert 'CUDA_INDEX="${TORCH_INDEX}/cu${CUDA_VERSION//./}"' in setup  # cu128 for 12.8, torch's index naming

    # Every CUDA version any of them mentions, in prose, an image tag, a setting or a torch index URL (cu128).
    spelled = [r"CUDA (\d+\.\d+)", r"nvidia/cuda:(\d+\.\d+)", r'CUDA_VERSION="(\d+\.\d+)"', r'cuda: "(\d+\.\d+)"']
    for name in ("scripts/setup.sh", "README.md", "cog.yaml", "Dockerfile", "deploy/cog/requirements.txt"):
        text = (ROOT / name).read_text()
        named = {v for pattern in spelled for v in re.findall(pattern, text)}
        named |= {f"{major}.{minor}" for major, minor in re.findall(r"/whl/cu(\d\d)(\d)\b", text)}
        assert named == {version}, f"{name} names CUDA {sorted(named)}, not just {version}"


@pytest.mark.slow
def test_image_start_command_downloads_weights_and_passes_its_health_check(case_a_http: str, tmp_path: Path) -> None:
    """The Dockerfile's CMD and HEALTHCHECK, run with the image's environment, weights downloaded on start."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ANYDOOR_")},
        **{k: v for k, v in dockerfile_env().items() if k != "PATH"},
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        # What differs outside the container: no GPU, a free port on loopback, the tiny model over HTTP.
        "ANYDOOR_HOST": "127.0.0.1",
        "ANYDOOR_PORT": str(port),
        "ANYDOOR_DEVICE": "cpu",
        "ANYDOOR_CACHE_DIR": str(tmp_path / "cache"),
        "ANYDOOR_WEIGHTS": f"{case_a_http}/model.safetensors",
        "ANYDOOR_WEIGHTS_SHA256": hashlib.sha256((CASE / "model.safetensors").read_bytes()).hexdigest(),
        "ANYDOOR_CONFIG": str(CASE / "model.yaml"),
        "ANYDOOR_WARMUP_STEPS": "1",
    }
    healthcheck = dockerfile_healthcheck()

    def healthy() -> bool:
        return subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode == 0

    assert not healthy()  # nothing listens yet: the check must fail, not pass vacuously

    command = dockerfile_cmd()
    if command[0] == "anydoor" and shutil.which("anydoor", path=bin_dir) is None:
        command = [sys.executable, "-m", "service.cli", *command[1:]]  # not pip-installed: run it from the source
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not healthy():
            assert proc.poll() is None, f"the service exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not healthy in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        cached = list((tmp_path / "cache").rglob("model.safetensors"))
        assert len(cached) == 1 and cached[0].read_bytes() == (CASE / "model.safetensors").read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=shutdown_budget(env))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()[-3000:]
