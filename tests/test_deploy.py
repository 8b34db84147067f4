"""The deployment artifacts (deploy/, Dockerfile, .dockerignore), each checked by its own tool.

systemd-analyze, systemd-sysusers, hadolint, kubernetes-validate and promtool do the checking;
a test skips only when its tool is not installed. Only the role test needs PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import yaml

if TYPE_CHECKING:
    from tests.servers import TestServer

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "pg-reaper.service"
SYSUSERS = DEPLOY / "systemd" / "pg-reaper.sysusers"
DOCKERFILE = ROOT / "Dockerfile"
K8S = DEPLOY / "kubernetes"
MANIFESTS = sorted(K8S.glob("*.yaml"))  # the Kubernetes objects; prometheus-scrape.yml is not one
SCRAPE_CONFIG = K8S / "prometheus-scrape.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
ROLE_SQL = DEPLOY / "sql" / "pg_reaper_role.sql"

KUBERNETES_VERSION = "1.30.0"
# What `systemd-analyze security --offline=true` gave deploy/systemd/pg-reaper.service with
# systemd 252 (Debian 12): 1.1 "OK". Its --threshold= counts in tenths.
EXPOSURE_MAX = 1.1
EXEC_START = "/usr/local/bin/pg-reaper run -c /etc/pg-reaper/config.toml"
METRICS_PORT = 9188

# docs/daemon.md, "Metrics": the only names a dashboard or an alert may use.
METRICS = frozenset(
    {
        "pg_reaper_sessions_reaped_total",
        "pg_reaper_reap_failures_total",
        "pg_reaper_candidates",
        "pg_reaper_deferred_total",
        "pg_reaper_sessions",
        "pg_reaper_max_connections",
        "pg_reaper_connections_used",
        "pg_reaper_connections_usable",
        "pg_reaper_pressure",
        "pg_reaper_poll_duration_seconds_bucket",  # the histogram's series
        "pg_reaper_poll_duration_seconds_sum",
        "pg_reaper_poll_duration_seconds_count",
        "pg_reaper_poll_errors_total",
        "pg_reaper_server_up",
        "pg_reaper_leader",
        "pg_reaper_lock_held_by_other",
        "pg_reaper_ha_probes_total",
        "pg_reaper_last_poll_timestamp_seconds",
        "pg_reaper_dry_run",
        "pg_reaper_config_last_reload_successful",
        "pg_reaper_build_info",
        "pg_reaper_audit_errors_total",
    }
)


# Metrics of the whole process, without a server label (and Prometheus' own up).
PER_INSTANCE = frozenset(
    {
        "pg_reaper_dry_run",
        "pg_reaper_config_last_reload_successful",
        "pg_reaper_build_info",
        "pg_reaper_audit_errors_total",
        "up",
    }
)


def _tool(name: str) -> str:
    """The venv's copy first (hadolint, kubernetes-validate), then $PATH; skip when neither."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/test installs promtool; see docs/deploy.md)")
    return found


def _run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYSTEMD_", "HADOLINT_"))}
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        check=False,
        timeout=120,
    )


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def _metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: what remains once strings, label matchers,
    durations, functions, grouping labels, keywords and numbers are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\boffset\s+\w+", " ", expr)
    expr = re.sub(r"\b[a-zA-Z_]\w*\s*\(", "(", expr)  # function calls and aggregations
    keywords = {"and", "or", "unless", "bool", "inf", "nan"}
    return {t for t in re.findall(r"\b[a-zA-Z_:][\w:]*\b", expr) if t.lower() not in keywords}


# --- systemd -----------------------------------------------------------------------------------


def test_unit_has_the_required_settings() -> None:
    settings = _unit_settings(UNIT.read_text(encoding="utf-8"))
    expected = {
        "Type": "notify",
        "ExecStart": EXEC_START,
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "User": "pg-reaper",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert settings.get(key, [None])[0] == value, key
    assert "@system-service" in settings["SystemCallFilter"]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    systemd_analyze = _tool("systemd-analyze")
    # verify insists that ExecStart's program exists and is executable, and pg-reaper is not
    # installed in /usr/local/bin here: check a copy of the unit whose ExecStart points at a
    # stand-in. Everything else is the file as shipped.
    program = tmp_path / "pg-reaper"
    program.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    program.chmod(program.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(f"ExecStart={EXEC_START}\n") == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/usr/local/bin/pg-reaper", str(program)), encoding="utf-8")

    result = _run(systemd_analyze, "verify", unit)

    # Any output at all is a warning about the unit (SYSTEMD_LOG_LEVEL left at its default).
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_unit_exposure_is_at_most_the_measured_score() -> None:
    systemd_analyze = _tool("systemd-analyze")
    threshold = str(round(EXPOSURE_MAX * 10))
    result = _run(
        systemd_analyze,
        "security",
        "--offline=true",
        f"--threshold={threshold}",
        "--no-pager",
        UNIT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for pg-reaper\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= EXPOSURE_MAX


def test_sysusers_creates_the_units_user(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()

    result = _run(sysusers, f"--root={tmp_path}", SYSUSERS)

    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text(encoding="utf-8").splitlines()
    user = _unit_settings(UNIT.read_text(encoding="utf-8"))["User"][0]
    entry = next(line.split(":") for line in passwd if line.startswith(f"{user}:"))
    assert entry[6] == "/usr/sbin/nologin"
    assert 0 < int(entry[2]) < 1000  # a system account


# --- container image ---------------------------------------------------------------------------


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    # Our own empty configuration, so that no .hadolint.yaml of the machine ignores anything,
    # and a failure on every level down to style. Rules may only be ignored inline, with a reason.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\nignored: []\n", encoding="utf-8")

    result = _run(hadolint, "--config", config, "--no-color", DOCKERFILE)

    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_dockerfile_runs_pg_reaper_as_documented() -> None:
    lines = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ").splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    froms = [i.split()[1] for i in instructions if i.startswith("FROM ")]
    assert len(froms) == 2  # build stage and runtime stage
    for image in froms:
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm", image), image
    last_stage = instructions[max(i for i, x in enumerate(instructions) if x.startswith("FROM ")) :]
    user = [i.split()[1] for i in last_stage if i.startswith("USER ")]
    assert len(user) == 1
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[0])  # numeric and not root: runAsNonRoot
    assert f"EXPOSE {METRICS_PORT}" in last_stage
    assert 'ENTRYPOINT ["pg-reaper"]' in last_stage
    assert 'CMD ["run", "-c", "/etc/pg-reaper/config.toml"]' in last_stage
    healthcheck = next(i for i in last_stage if i.startswith("HEALTHCHECK "))
    assert f"http://127.0.0.1:{METRICS_PORT}/healthz" in healthcheck
    assert any("COPY --from=build /opt/pg-reaper /opt/pg-reaper" in i for i in last_stage)
    assert any('pip install --no-cache-dir ".[notify]"' in i for i in instructions)
    assert any('/opt/pg-reaper/bin/python -c "import apprise"' in i for i in instructions)


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    build = pytest.importorskip("docker.utils.build", reason="docker (Python) is not installed")
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sent = set(build.exclude_paths(str(ROOT), patterns))  # docker-py's .dockerignore semantics

    for copied in ("pyproject.toml", "README.md", "reaper/__init__.py", "reaper/py.typed"):
        assert copied in sent
    assert any(path.startswith("reaper/pg/sql/") and path.endswith(".sql") for path in sent)
    kept_out = (".venv", ".git", "tests", "deploy", "bench", "scripts", "docs", ".ci")
    for path in sent:
        assert not path.startswith(kept_out), path
        assert "__pycache__" not in path, path
        assert not re.search(r"(^|/)\.\w+_cache(/|$)|\.egg-info|\.hypothesis", path), path


# --- Kubernetes --------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_kubernetes_validate(manifest: Path) -> None:
    kubernetes_validate = _tool("kubernetes-validate")
    # The schemas ship with the package: no cluster, no network. --strict rejects unknown keys.
    result = _run(kubernetes_validate, "--strict", "-k", KUBERNETES_VERSION, "--quiet", manifest)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def _objects(kind: str, manifest: Path) -> list[dict[str, Any]]:
    return [doc for doc in _yaml_documents(manifest) if doc["kind"] == kind]


def _by_name(kind: str, manifest: Path) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _objects(kind, manifest)}


def _reaper_pod(manifest: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The Deployment that runs pg-reaper, its pod template and the pg-reaper container."""
    for deployment in _objects("Deployment", manifest):
        template = deployment["spec"]["template"]
        for container in template["spec"]["containers"]:
            if container["name"] == "pg-reaper":
                return deployment, template, container
    raise AssertionError(f"no pg-reaper container in {manifest.name}")


def _config_text(manifest: Path) -> str:
    _, template, container = _reaper_pod(manifest)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    config_map = volumes[mounts["/etc/pg-reaper"]]["configMap"]["name"]
    text = _by_name("ConfigMap", manifest)[config_map]["data"]["config.toml"]
    assert isinstance(text, str)
    return text


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_reaper_pod_is_locked_down_probed_and_scraped(manifest: Path) -> None:
    _, template, reaper = _reaper_pod(manifest)
    spec = template["spec"]
    assert spec["automountServiceAccountToken"] is False
    # No PG_REAPER_* variables from a Service named pg-reaper...: settings come from the file.
    assert spec["enableServiceLinks"] is False
    for container in spec["containers"]:
        context = {**spec.get("securityContext", {}), **container["securityContext"]}
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] > 0
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert {"requests", "limits"} <= container["resources"].keys()
    ports = {p["name"]: p["containerPort"] for p in reaper["ports"]}
    assert ports == {"metrics": METRICS_PORT}
    assert reaper["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert reaper["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert reaper["args"] == ["run", "-c", "/etc/pg-reaper/config.toml"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_reaper_config_matches_the_pod(manifest: Path) -> None:
    """listen reachable from the kubelet and Prometheus; every password_file in a mounted Secret."""
    _, template, reaper = _reaper_pod(manifest)
    config = tomllib.loads(_config_text(manifest))
    # Every address, IPv4 and IPv6 (the pod IP); the NetworkPolicy limits who gets there.
    assert config["metrics"]["listen"] == f":{METRICS_PORT}"
    mounts = {m["mountPath"]: m["name"] for m in reaper["volumeMounts"]}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    secrets = _by_name("Secret", manifest)
    for server in config["servers"]:
        path = Path(server["password_file"])
        secret = volumes[mounts[str(path.parent)]]["secret"]["secretName"]
        assert path.name in secrets[secret]["stringData"], (server["name"], secret)


# Where Prometheus runs, as the manifests' NetworkPolicies expect it (their comments say so).
PROMETHEUS_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
PROMETHEUS_POD = {"app.kubernetes.io/name": "prometheus"}
# Where the manifests are applied (they name no namespace of their own).
REAPER_NAMESPACE = {"kubernetes.io/metadata.name": "databases"}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # what _admits understands
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def _admits(manifest: Path, *, namespace: dict[str, str], pod: dict[str, str], port: int) -> bool:
    """Whether the manifest's NetworkPolicies let a pod in this namespace reach the reaper's pod
    on `port` (Kubernetes' rules: policies add up; a peer's two selectors must both match; a
    peer without a namespaceSelector means the policy's own namespace, REAPER_NAMESPACE)."""
    _, template, _ = _reaper_pod(manifest)
    policies = [
        p
        for p in _objects("NetworkPolicy", manifest)
        if _selects(p["spec"]["podSelector"], template["metadata"]["labels"])
        and "Ingress" in p["spec"]["policyTypes"]
    ]
    if not policies:
        return True  # an isolated pod only once a policy selects it
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(
                p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports
            ):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                assert set(peer) <= {"namespaceSelector", "podSelector"}, peer
                in_namespace = (
                    _selects(peer["namespaceSelector"], namespace)
                    if "namespaceSelector" in peer
                    else namespace == REAPER_NAMESPACE
                )
                if in_namespace and _selects(peer.get("podSelector", {}), pod):
                    return True
    return False


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_only_prometheus_reaches_the_metrics_port(manifest: Path) -> None:
    def admits(namespace: dict[str, str], pod: dict[str, str]) -> bool:
        return _admits(manifest, namespace=namespace, pod=pod, port=METRICS_PORT)

    assert admits(PROMETHEUS_NAMESPACE, PROMETHEUS_POD)
    assert admits(PROMETHEUS_NAMESPACE, {**PROMETHEUS_POD, "other": "label"})
    # Another pod of the monitoring namespace, a "Prometheus" elsewhere, anything else: no.
    assert not admits(PROMETHEUS_NAMESPACE, {"app.kubernetes.io/name": "grafana"})
    assert not admits({"kubernetes.io/metadata.name": "default"}, PROMETHEUS_POD)
    assert not admits({"kubernetes.io/metadata.name": "apps"}, {"app": "web"})
    assert not admits(REAPER_NAMESPACE, {"app": "web"})
    assert not admits(REAPER_NAMESPACE, PROMETHEUS_POD)
    # Every other port the pod serves stays reachable: the policy only closes the metrics port.
    _, template, _ = _reaper_pod(manifest)
    for container in template["spec"]["containers"]:
        for port in container["ports"]:
            if port["containerPort"] != METRICS_PORT:
                assert _admits(
                    manifest,
                    namespace={"kubernetes.io/metadata.name": "apps"},
                    pod={"app": "web"},
                    port=port["containerPort"],
                ), (container["name"], port)


def test_sidecar_shares_the_socket_directory() -> None:
    manifest = K8S / "sidecar.yaml"
    _, template, _ = _reaper_pod(manifest)
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    containers = {c["name"]: c for c in template["spec"]["containers"]}
    assert containers["postgres"]["image"] == "postgres:18"
    # From 18 on the image keeps PGDATA in /var/lib/postgresql/18/docker, under this volume.
    data = [m for m in containers["postgres"]["volumeMounts"] if m["name"] == "data"]
    assert [m["mountPath"] for m in data] == ["/var/lib/postgresql"]
    shared = []
    for container in containers.values():
        mount = next(
            m for m in container["volumeMounts"] if m["mountPath"] == "/var/run/postgresql"
        )
        assert "emptyDir" in volumes[mount["name"]]
        shared.append(mount["name"])
    assert len(set(shared)) == 1
    config = tomllib.loads(_config_text(manifest))
    assert "host=/var/run/postgresql" in config["servers"][0]["dsn"]


def test_sidecar_initdb_creates_the_role_from_the_sql_file(tmp_path: Path) -> None:
    initdb = _by_name("ConfigMap", K8S / "sidecar.yaml")["pg-reaper-initdb"]["data"]
    assert initdb["10-pg-reaper-role.sql"] == ROLE_SQL.read_text(encoding="utf-8")
    script = tmp_path / "20-pg-reaper-password.sh"
    script.write_text(initdb["20-pg-reaper-password.sh"], encoding="utf-8")
    result = _run(_tool("bash"), "-n", script)
    assert (result.returncode, result.stderr) == (0, "")


def test_central_runs_two_replicas_with_ha_a_disruption_budget_and_a_metrics_service() -> None:
    manifest = K8S / "central.yaml"
    deployment, template, _ = _reaper_pod(manifest)
    labels = template["metadata"]["labels"]
    # Two replicas sharing every server through [ha]: never both down by choice.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (budget,) = _objects("PodDisruptionBudget", manifest)
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spread = template["spec"]["affinity"]["podAntiAffinity"]
    (term,) = spread["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    (service,) = _objects("Service", manifest)
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}
    ]
    config = tomllib.loads(_config_text(manifest))
    assert config["ha"]["enabled"] is True
    assert "instance_id" not in config["ha"]  # the pod's name: one id per replica
    assert len(config["servers"]) > 1
    assert all("host=/" not in server["dsn"] for server in config["servers"])  # over TCP


# The ConfigMaps' config.toml go through check-config in tests/test_docs.py, with every other
# documented TOML.


# --- Prometheus --------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = _run(_tool("promtool"), "check", "rules", "--lint=all", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    result = _run(_tool("promtool"), "test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_fires_in_a_test_and_stays_quiet_in_another() -> None:
    cases = [
        case
        for test in yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in _alert_rules():
        name = rule["alert"]
        outcomes = {bool(case["exp_alerts"]) for case in cases if case["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: needs a firing and a quiet test case"


def test_alerts_are_labelled_annotated_and_use_only_real_metrics() -> None:
    scrape_job = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))["scrape_configs"][0]
    rules = _alert_rules()
    expected = {
        "PgReaperReapBurst",
        "PgReaperReapingNeverStops",
        "PgReaperServerDown",
        "PgReaperNoLeader",
        "PgReaperLockHeldByOther",
        "PgReaperPollErrors",
        "PgReaperPollsStale",
        "PgReaperCannotSeeSessions",
        "PgReaperConnectionsNearLimit",
        "PgReaperAuditErrors",
        "PgReaperConfigReloadFailed",
        "PgReaperDryRunLeftOn",
        "PgReaperSessionsDeferred",
        "PgReaperSignalFailures",
        "PgReaperDown",
        "PgReaperAbsent",
    }
    assert expected <= {rule["alert"] for rule in rules}
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert {"summary", "description"} <= rule["annotations"].keys()
        names = _metric_names(rule["expr"])
        assert names <= METRICS | {"up"}, (rule["alert"], names - METRICS)
        if names - PER_INSTANCE:  # a metric with a server label: say which server
            assert "{{ $labels.server }}" in rule["annotations"]["summary"], rule["alert"]
        if "up" in names:
            assert f'up{{job="{scrape_job["job_name"]}"}}' in rule["expr"]


def test_scrape_config_passes_promtool(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    snippet = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    (job,) = snippet["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump({"global": {"scrape_interval": "30s"}, **snippet}), encoding="utf-8"
    )
    result = _run(promtool, "check", "config", config)
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian's promtool is built without Kubernetes discovery: it cannot parse that one
        # block. Check the rest of the job (relabelling rules and all) with a static target in
        # its place; test_scrape_relabelling_* below plays the discovery through the rules.
        job["static_configs"] = [{"targets": [f"10.0.0.1:{METRICS_PORT}"]}]
        del job["kubernetes_sd_configs"]
        config.write_text(
            yaml.safe_dump({"global": {"scrape_interval": "30s"}, **snippet}), encoding="utf-8"
        )
        result = _run(promtool, "check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' keep, drop and replace relabelling (anchored regexes), enough for our job."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(str(rule.get("regex", "(.*)")), value)
        action = rule.get("action", "replace")
        if action == "keep" and match is None:
            return None
        if action == "drop" and match is not None:
            return None
        if action == "replace" and match is not None:
            replacement = re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
    return {k: v for k, v in labels.items() if not k.startswith("__meta_") and v}


def _pod_targets(manifest: Path, *, ip: str, phase: str = "Running") -> list[dict[str, str]]:
    """What Kubernetes pod discovery makes of a manifest's pod: one target per container port."""
    deployment, template, _ = _reaper_pod(manifest)
    common = {
        "__meta_kubernetes_namespace": "databases",
        "__meta_kubernetes_pod_name": f"{deployment['metadata']['name']}-0",
        "__meta_kubernetes_pod_phase": phase,
        "__metrics_path__": "/metrics",
    }
    for key, value in template["metadata"].get("annotations", {}).items():
        common[f"__meta_kubernetes_pod_annotation_{re.sub(r'[^a-zA-Z0-9_]', '_', key)}"] = value
    return [
        {
            **common,
            "__address__": f"[{ip}]:{port['containerPort']}"
            if ":" in ip
            else f"{ip}:{port['containerPort']}",
            "__meta_kubernetes_pod_container_name": container["name"],
            "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
        }
        for container in template["spec"]["containers"]
        for port in container.get("ports", [])
    ]


def test_scrape_relabelling_finds_each_reaper_once() -> None:
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))["scrape_configs"]
    rules = job["relabel_configs"]
    discovered = [
        *_pod_targets(K8S / "sidecar.yaml", ip="10.1.0.7"),
        *_pod_targets(K8S / "central.yaml", ip="fd00::8"),
        *_pod_targets(K8S / "central.yaml", ip="10.1.0.9", phase="Pending"),
    ]
    unannotated = _pod_targets(K8S / "central.yaml", ip="10.1.0.10")
    for target in unannotated:
        target["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] = "false"

    kept = [t for t in (_relabel(d, rules) for d in [*discovered, *unannotated]) if t is not None]

    assert sorted(t["__address__"] for t in kept) == ["10.1.0.7:9188", "[fd00::8]:9188"]
    for target in kept:
        assert target["__metrics_path__"] == "/metrics"
        assert target["namespace"] == "databases"
        assert target["pod"]


# --- Grafana -----------------------------------------------------------------------------------


def _dashboard_targets(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in panels:
        found += panel.get("targets", [])
        found += _dashboard_targets(panel.get("panels", []))
    return found


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "server"
    assert variable["query"]["query"] == "label_values(pg_reaper_server_up, server)"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    for target in _dashboard_targets(dashboard["panels"]):
        assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_queries_use_only_real_metrics_and_cover_them() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used: set[str] = set()
    for target in _dashboard_targets(dashboard["panels"]):
        names = _metric_names(target["expr"])
        assert names, target["expr"]
        assert names <= METRICS, (target["expr"], names - METRICS)
        used |= names
    wanted = {
        "pg_reaper_sessions",
        "pg_reaper_sessions_reaped_total",
        "pg_reaper_reap_failures_total",
        "pg_reaper_candidates",
        "pg_reaper_poll_duration_seconds_bucket",
        "pg_reaper_server_up",
        "pg_reaper_leader",
        "pg_reaper_lock_held_by_other",
        "pg_reaper_deferred_total",
        "pg_reaper_dry_run",
        "pg_reaper_config_last_reload_successful",
    }
    assert wanted <= used, wanted - used


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every query, as recording rules, once Grafana's variables are filled in."""
    promtool = _tool("promtool")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    rules = [
        {
            "record": f"dashboard:query_{index}",
            "expr": target["expr"]
            .replace("$__rate_interval", "2m")
            .replace("$server", "primary|replica"),
        }
        for index, target in enumerate(_dashboard_targets(dashboard["panels"]))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8"
    )

    result = _run(promtool, "check", "rules", path)

    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_name_extraction() -> None:
    expr = (
        'sum without (policy) (increase(pg_reaper_deferred_total{server=~"a|b"}[5m] offset 1h))'
        ' > 0 or up{job="x"} unless on (server) time() - pg_reaper_last_poll_timestamp_seconds'
    )
    assert _metric_names(expr) == {
        "pg_reaper_deferred_total",
        "up",
        "pg_reaper_last_poll_timestamp_seconds",
    }


# --- PostgreSQL role ---------------------------------------------------------------------------

ROLE = "pg-reaper"  # "pg_reaper" cannot be: PostgreSQL reserves role names starting with pg_
ROLE_PASSWORD = "Reaper-Role-Pa55"


def _role_state(pg: TestServer) -> dict[str, Any]:
    rows = pg.execute(
        """
        SELECT r.rolcanlogin, r.rolinherit, r.rolconnlimit, r.rolsuper, r.rolcreaterole,
               r.rolcreatedb, r.rolreplication, r.rolbypassrls,
               pg_has_role(r.oid, 'pg_signal_backend', 'USAGE'),
               pg_has_role(r.oid, 'pg_read_all_stats', 'USAGE'),
               (SELECT pg_has_role(r.oid, g.oid, 'USAGE') FROM pg_roles g
                 WHERE g.rolname = 'pg_use_reserved_connections'),
               (SELECT array_agg(g.rolname::text ORDER BY g.rolname)
                  FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                 WHERE m.member = r.oid)
          FROM pg_roles r WHERE r.rolname = %s
        """,
        [ROLE],
    )
    assert len(rows) == 1, f"role {ROLE} does not exist"
    keys = (
        *("login", "inherit", "connlimit", "super", "createrole", "createdb", "replication"),
        *("bypassrls", "signal", "stats", "reserved", "member_of"),
    )
    return dict(zip(keys, rows[0], strict=True))


@pytest.mark.integration
def test_role_sql_is_idempotent_and_least_privileged(pg: TestServer) -> None:
    sql = ROLE_SQL.read_text(encoding="utf-8")
    memberships = ["pg_read_all_stats", "pg_signal_backend"]
    if pg.major >= 16:
        memberships = sorted([*memberships, "pg_use_reserved_connections"])
    expected = {
        "login": True,
        "inherit": True,
        "connlimit": 3,
        "super": False,
        "createrole": False,
        "createdb": False,
        "replication": False,
        "bypassrls": False,
        "signal": True,
        "stats": True,
        # pg_use_reserved_connections exists from PostgreSQL 16 on.
        "reserved": True if pg.major >= 16 else None,
        "member_of": memberships,  # and nothing else
    }
    drop = f'DROP ROLE IF EXISTS "{ROLE}"'
    pg.execute(drop)
    try:
        pg.execute(sql)
        pg.execute(sql)  # a second run changes nothing and fails on nothing
        assert _role_state(pg) == expected

        # A role that was there before, made by hand and wrongly: the file puts it right.
        pg.execute(drop)
        pg.execute(f'CREATE ROLE "{ROLE}" NOLOGIN NOINHERIT CONNECTION LIMIT 1')
        if pg.major >= 16:
            pg.execute(f'GRANT pg_signal_backend TO "{ROLE}" WITH INHERIT FALSE')
        pg.execute(sql)
        assert _role_state(pg) == expected

        pg.execute(f"ALTER ROLE \"{ROLE}\" PASSWORD '{ROLE_PASSWORD}'")
        dsn = pg.dsn(user=ROLE, password=ROLE_PASSWORD, dbname="postgres", tcp=True)
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            # pg_read_all_stats at work: the suite's superuser session shows its state.
            hidden = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND state IS NULL"
            ).fetchone()
            assert hidden == (0,)
            me = conn.execute(
                "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
            )
            assert me.fetchone() == (ROLE, False)
    finally:
        pg.execute(drop)
