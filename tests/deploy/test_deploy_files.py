"""deploy/ validated against its schemas and tools: Kubernetes manifests (kubernetes-validate),
the compose file (the Compose Specification's JSON schema), Dockerfiles (hadolint), Prometheus
config and rules (promtool), Grafana provisioning, and every LOOPCHAT_* variable they set."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from feedback.log import FeedbackWriter
from loopchat.settings import Settings
from monitoring.dashboards import DASHBOARDS
from retrain.config import load_config
from rollout.experiment_spec import load_specs
from tests.utils.prometheus import promtool, skip_or_fail_without_prometheus

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
K8S = sorted(p for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in K8S for doc in documents(path)]


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("manifest", K8S, ids=lambda p: p.name)
def test_kubernetes_manifest_is_valid(manifest: Path) -> None:
    checked = tool("kubernetes-validate", "--strict", "--quiet", str(manifest))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S)


def k8s_by_name() -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in k8s_objects()}


def test_kubernetes_objects_fit_together() -> None:
    objects = k8s_by_name()
    servers = objects[("StatefulSet", "loopchat")]
    pod = servers["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert servers["spec"]["replicas"] >= 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Both Services select the servers' pods and reach its named port; the headless one is the
    # StatefulSet's governing Service.
    labels = servers["spec"]["template"]["metadata"]["labels"]
    governing = objects[("Service", servers["spec"]["serviceName"])]["spec"]
    assert governing["clusterIP"] == "None"
    assert servers["spec"]["selector"]["matchLabels"].items() <= labels.items()
    budget = objects[("PodDisruptionBudget", "loopchat")]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    for name in ("loopchat", "loopchat-pods"):
        service = objects[("Service", name)]["spec"]
        assert service["selector"].items() <= labels.items()
        assert service["ports"][0]["targetPort"] == container["ports"][0]["name"]
    cron = objects[("CronJob", "loopchat-retrain")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cron["containers"][0]["args"][:2] == ["retrain", "--if-due"]
    # Replicas and the retraining job see the shared adapter storage at the same path (the
    # registry stores each version's path), and every referenced object exists.
    for spec in (pod, cron):
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        adapters = mounts["/data/adapters"]
        assert adapters.get("subPath") == "adapters"
        claim = volumes[adapters["name"]]["persistentVolumeClaim"]["claimName"]
        assert ("PersistentVolumeClaim", claim) in objects
        assert ("ConfigMap", volumes[mounts["/etc/loopchat"]["name"]]["configMap"]["name"]) in objects
        for source in spec["containers"][0]["envFrom"]:
            kind, ref = (
                ("ConfigMap", source["configMapRef"])
                if "configMapRef" in source
                else ("Secret", source["secretRef"])
            )
            assert (kind, ref["name"]) in objects
    claim = objects[("PersistentVolumeClaim", "loopchat-adapters")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    annotations = servers["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_config_files_in_the_manifests_load(tmp_path: Path) -> None:
    config = next(o for o in k8s_objects() if o["metadata"]["name"] == "loopchat-config")["data"]
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(config["experiments.yaml"])
    assert load_specs(experiments) == []
    retrain = tmp_path / "retrain.yaml"
    retrain.write_text(config["retrain.yaml"])
    assert load_config(retrain).canary_policy.max_latency_p95_ratio == 3.0
    assert load_specs(DEPLOY / "experiments.example.yaml")


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_file_matches_the_compose_specification(name: str) -> None:
    checked = tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(DEPLOY / name))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_stack_runs_the_whole_loop() -> None:
    services = compose()["services"]
    assert {"loopchat", "postgres", "prometheus", "grafana", "retrain"} <= services.keys()
    assert services["retrain"]["command"][:2] == ["retrain", "--schedule"]
    # Mounted files exist, relative to deploy/ (compose resolves them against the file's folder).
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    build = services["loopchat"]["build"]
    dockerfile = build["dockerfile"].replace("${LOOPCHAT_IMAGE_VARIANT:-cpu}", "cpu")
    assert (DEPLOY / build["context"] / dockerfile).is_file()
    env_example = dict(
        line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines() if "=" in line
    )
    needed = {"POSTGRES_PASSWORD", "LOOPCHAT_ADMIN_TOKEN", "GRAFANA_ADMIN_PASSWORD"}
    assert needed <= env_example.keys()


def setting_exists(variable: str) -> bool:
    """Whether LOOPCHAT_A__B names a field of Settings (pydantic-settings ignores unknown ones)."""
    model: type[BaseModel] = Settings
    parts = variable.removeprefix("LOOPCHAT_").lower().split("__")
    for index, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if index < len(parts) - 1:
            model = field.annotation  # type: ignore[assignment]
    return True


def dockerfile_env(*dockerfiles: Path) -> dict[str, str]:
    """The ENV variables the Dockerfiles set (both images' unless named), comments skipped."""
    env: dict[str, str] = {}
    for docker in dockerfiles or sorted((DEPLOY / "docker").glob("Dockerfile.*")):
        lines = [line for line in docker.read_text().splitlines() if not line.lstrip().startswith("#")]
        for line in "\n".join(lines).replace("\\\n", " ").splitlines():
            if line.startswith("ENV "):
                env.update(pair.split("=", 1) for pair in line[4:].split() if "=" in pair)
    return env


def test_every_loopchat_variable_is_a_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kubernetes: dict[str, str] = {}
    for o in k8s_objects():
        if o["kind"] in ("ConfigMap", "Secret"):
            values = o.get("data") or o.get("stringData") or {}
            kubernetes.update({k: str(v) for k, v in values.items() if k.startswith("LOOPCHAT_")})
        for container in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []:
            for variable in container.get("env") or []:
                if variable["name"].startswith("LOOPCHAT_") and "value" in variable:
                    kubernetes[variable["name"]] = str(variable["value"])
    assert "LOOPCHAT_FEEDBACK__MAX_SPOOL_BYTES" in kubernetes
    named = {**kubernetes, **compose()["services"]["loopchat"]["environment"], **dockerfile_env()}
    loopchat = [k for k in named if k.startswith("LOOPCHAT_")]
    assert len(loopchat) >= 10
    assert [k for k in loopchat if not setting_exists(k)] == []
    # The image's and the manifests' values parse; the Secret's placeholder token is refused
    # on purpose, so an unedited Secret cannot reach production.
    for key, value in {**dockerfile_env(), **kubernetes}.items():
        if key.startswith("LOOPCHAT_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOOPCHAT_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="admin_token is a placeholder"):
        Settings()
    monkeypatch.setenv("LOOPCHAT_ADMIN_TOKEN", "a-real-token-of-32-characters-xx")
    # So is the placeholder password of the Secret's database URL.
    with pytest.raises(ValueError, match="database_url has a placeholder password"):
        Settings()
    database_url = kubernetes["LOOPCHAT_DATABASE_URL"].replace("REPLACE_ME", "a-real-password")
    monkeypatch.setenv("LOOPCHAT_DATABASE_URL", database_url)
    settings = Settings()
    assert settings.environment == "production" and settings.ab.experiments_file is not None
    assert settings.db_url.startswith("postgresql+psycopg://")


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_copy_every_package_the_project_installs(name: str) -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \1$", (DEPLOY / "docker" / name).read_text(), re.M))
    assert packages and packages == copied


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_run_in_production(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The images listen on every address: in production, so /v1 needs API keys; the same
    variables in development mode refuse to start instead of serving without keys."""
    env = dockerfile_env(DEPLOY / "docker" / name)
    assert env["LOOPCHAT_ENVIRONMENT"] == "production"
    for key, value in env.items():
        if key.startswith("LOOPCHAT_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOOPCHAT_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.environment == "production" and settings.host == "0.0.0.0"
    assert settings.keys_required
    monkeypatch.setenv("LOOPCHAT_ENVIRONMENT", "development")
    with pytest.raises(ValueError, match="not a loopback address"):
        Settings()


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes storage quantity (2Gi, 500M, 1073741824) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G)?", quantity).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit or "", 1)


def test_each_replica_keeps_its_spool_on_its_own_volume() -> None:
    """The spool of records acknowledged during a database outage lives on a claim per replica
    (not the pod's emptyDir), so it survives the pod's restart and rescheduling, and the spool's
    cap leaves room on that volume."""
    servers = k8s_by_name()[("StatefulSet", "loopchat")]["spec"]
    pod = servers["template"]["spec"]
    container = pod["containers"][0]
    spool_dir = Settings(data_dir=dockerfile_env()["LOOPCHAT_DATA_DIR"]).spool_dir
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == spool_dir)
    assert mount["name"] not in {v["name"] for v in pod["volumes"]}
    claim = next(c for c in servers["volumeClaimTemplates"] if c["metadata"]["name"] == mount["name"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    size = quantity_bytes(claim["spec"]["resources"]["requests"]["storage"])
    retention = servers["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    env = {e["name"]: e["value"] for e in container["env"]}
    cap = int(env["LOOPCHAT_FEEDBACK__MAX_SPOOL_BYTES"])
    assert size // 2 <= cap <= size * 0.9  # used, with headroom for the filesystem's own reserve


def test_grace_period_covers_prestop_and_both_drains() -> None:
    """Kubernetes kills a pod terminationGracePeriodSeconds after preStop starts: that covers the
    preStop sleep, the HTTP drain after SIGTERM and the log writer's drain after it."""
    found = re.search(r'"timeout_graceful_shutdown": (\d+)', (REPO / "serving" / "cli.py").read_text())
    assert found, "serve's HTTP drain timeout moved: read it from its new place here"
    http_drain = int(found[1])
    writer_drain = inspect.signature(FeedbackWriter.close).parameters["timeout"].default
    pod = k8s_by_name()[("StatefulSet", "loopchat")]["spec"]["template"]["spec"]
    sleep, seconds = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(seconds) + http_drain + writer_drain + 5
    # compose has no preStop: SIGTERM comes first.
    stop = compose()["services"]["loopchat"]["stop_grace_period"]
    assert int(stop.removesuffix("s")) >= http_drain + writer_drain + 5


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_lints_clean(name: str) -> None:
    config = DEPLOY / "docker" / ".hadolint.yaml"
    checked = tool("hadolint", "--config", str(config), str(DEPLOY / "docker" / name))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = (DEPLOY / "docker" / name).read_text()
    # Runs as a numeric non-root user (Kubernetes' runAsNonRoot can check it) and installs the
    # package the way a checkout does, without the test tools.
    assert "\nUSER 10001:10001\n" in text
    assert "deploy/install.sh /opt/loopchat" in text and " runtime" in text
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".data", ".git"} <= ignored


def test_prometheus_configs_and_rules_pass_promtool() -> None:
    skip_or_fail_without_prometheus()
    for config in ("prometheus.yml", "prometheus-kubernetes.yml"):
        checked = subprocess.run(
            [promtool(), "check", "config", "--syntax-only", str(DEPLOY / "prometheus" / config)],
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = subprocess.run(
        [promtool(), "check", "rules", str(DEPLOY / "prometheus" / "rules" / "loopchat.yml")],
        capture_output=True,
        text=True,
    )
    assert rules.returncode == 0 and "SUCCESS" in rules.stdout, rules.stdout + rules.stderr
    # Compose mounts the rules where the config looks for them.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in mounts


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/loopchat.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
    assert sorted(p.name for p in (DEPLOY / "grafana" / "dashboards").glob("*.json")) == [
        "loopchat-experiments.json",
        "loopchat-feedback-retraining.json",
        "loopchat-service.json",
    ]


def test_dashboards_on_disk_are_the_rendered_ones() -> None:
    """The JSON Grafana loads is what monitoring/dashboards.py declares (the panels the suite
    checks against Prometheus in tests/test_loop.py)."""
    folder = DEPLOY / "grafana" / "dashboards"
    for dashboard in DASHBOARDS:
        on_disk = json.loads((folder / f"{dashboard.uid}.json").read_text())
        assert on_disk == dashboard.render(), f"run: python -m monitoring.dashboards {folder}"
        targets = [t for panel in on_disk["panels"] for t in panel.get("targets", [])]
        assert targets and all(t["datasource"]["uid"] == "${datasource}" for t in targets)
