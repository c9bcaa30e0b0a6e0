"""Static checks of docker-compose.yml, the Dockerfile and the Prometheus/Grafana files it mounts.

No Docker engine is needed: every test reads the files and compares them with the repository, the
calmrun CLI and calmrun's settings model, so a broken path, port or verb fails here instead of at
``docker compose up``.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import ipaddress
import itertools
import json
import os
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "calmrun.yml"
GRAFANA_DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "calmrun.json"

EXPECTED_SERVICES = {"kafka", "worker", "aggregator", "prometheus", "grafana"}
DASHBOARD_METRICS = (
    "calmrun_cost_usd_total",
    "calmrun_tokens_total",
    "calmrun_step_latency_seconds_bucket",
    "calmrun_steps_total",
    "calmrun_dlq_depth",
    "calmrun_runs_in_flight",
)


# --------------------------------------------------------------------------------------------- helpers


@functools.cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), f"{COMPOSE_FILE.name}: top level must be a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    found = compose().get("services")
    assert isinstance(found, dict) and found, f"{COMPOSE_FILE.name}: no 'services' mapping"
    return found


def service(name: str) -> dict[str, Any]:
    assert name in services(), f"{COMPOSE_FILE.name}: service {name!r} missing"
    return services()[name]


def environment(name: str) -> dict[str, str]:
    """A service's environment as str -> str, whichever of the two compose syntaxes it uses."""
    env = service(name).get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in env)
        return {key: value for key, value in pairs}
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def as_argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def build_of(svc: dict[str, Any]) -> tuple[Path, Path] | None:
    """(context dir, Dockerfile path) of a service with ``build``, else None."""
    build = svc.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def worker_dockerfile() -> Path:
    built = build_of(service("worker"))
    assert built is not None, "worker: expected a 'build' section (it runs the repository's own image)"
    return built[1]


@functools.cache
def dockerfile_instructions(path: Path) -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return tuple(out)


def exec_form(args: str) -> list[str]:
    """Arguments of ENTRYPOINT/CMD: the JSON exec form, or the shell form split on whitespace."""
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError:
        return shlex.split(args)
    assert isinstance(parsed, list), f"expected a JSON list, got {args!r}"
    return [str(part) for part in parsed]


def last_instruction(path: Path, name: str) -> list[str]:
    found = [args for word, args in dockerfile_instructions(path) if word == name]
    return exec_form(found[-1]) if found else []


def copy_sources(path: Path) -> list[tuple[str, str]]:
    """(source, destination) of every COPY/ADD that reads from the build context."""
    pairs: list[tuple[str, str]] = []
    for word, args in dockerfile_instructions(path):
        if word not in {"COPY", "ADD"}:
            continue
        parts = exec_form(args) if args.startswith("[") else shlex.split(args)
        flags = [p for p in parts if p.startswith("--")]
        if any(flag.startswith("--from=") for flag in flags):
            continue
        operands = [p for p in parts if not p.startswith("--")]
        assert len(operands) >= 2, f"{path.name}: {word} {args!r} needs a source and a destination"
        pairs.extend((src, operands[-1]) for src in operands[:-1])
    return pairs


def parse_port(entry: Any) -> tuple[str, str, str, str]:
    """(host_ip, host_port, container_port, protocol) of one ``ports`` entry; host_port may be ''."""
    if isinstance(entry, dict):
        return (
            str(entry.get("host_ip", "")),
            str(entry.get("published", "")),
            str(entry.get("target", "")),
            str(entry.get("protocol", "tcp")),
        )
    text = str(entry)
    text, _, protocol = text.partition("/")
    parts = text.rsplit(":", 2)
    if len(parts) == 1:
        return "", "", parts[0], protocol or "tcp"
    if len(parts) == 2:
        return "", parts[0], parts[1], protocol or "tcp"
    return parts[0], parts[1], parts[2], protocol or "tcp"


def valid_port_spec(spec: str) -> bool:
    """A port or a ``low-high`` range, each within 1..65535."""
    bounds = spec.split("-")
    if len(bounds) > 2 or not all(b.isdigit() and 1 <= int(b) <= 65535 for b in bounds):
        return False
    return len(bounds) == 1 or int(bounds[0]) <= int(bounds[1])


def volume_mounts(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, source, target) of each entry in a service's ``volumes``; type is 'bind' or 'volume'."""
    mounts: list[tuple[str, str, str]] = []
    for entry in svc.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append((entry.get("type", "volume"), str(entry.get("source", "")), str(entry["target"])))
            continue
        parts = str(entry).split(":")
        if len(parts) == 1:  # anonymous volume: container path only
            mounts.append(("volume", "", parts[0]))
            continue
        source, target = parts[0], parts[1]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        mounts.append((kind, source, target))
    return mounts


def bind_target(service_name: str, host_path: Path) -> str | None:
    """Container path at which ``host_path`` (or a directory holding it) is bind-mounted, if any."""
    for kind, source, target in volume_mounts(service(service_name)):
        if kind != "bind":
            continue
        src = (COMPOSE_FILE.parent / source).resolve()
        if host_path == src:
            return target
        if host_path.is_relative_to(src):
            return f"{target.rstrip('/')}/{host_path.relative_to(src).as_posix()}"
    return None


def listener_map(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}."""
    out: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, address = item.partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, int(port))
    return out


def dashboard_panels() -> list[dict[str, Any]]:
    """Every non-row panel, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in json.loads(GRAFANA_DASHBOARD.read_text()).get("panels", []):
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


@functools.cache
def cli_verbs() -> frozenset[str]:
    """Command names of the typer app ``calmrun.cli.app``; fails the calling test if it cannot be read."""
    import typer

    try:
        cli = importlib.import_module("calmrun.cli")
    except Exception as exc:
        pytest.fail(f"calmrun.cli cannot be imported ({type(exc).__name__}: {exc}); CLI verbs unknown")
    app = getattr(cli, "app", None)
    assert isinstance(app, typer.Typer), f"calmrun.cli.app should be a typer.Typer, got {type(app).__name__}"
    # A click Group (typer >= 0.2x vendors click, so test the attribute, not the class).
    commands = getattr(typer.main.get_command(app), "commands", None)
    assert isinstance(commands, dict), (
        "calmrun.cli.app has a single command, not subcommands: `calmrun worker` needs a group"
    )
    return frozenset(commands)


# ------------------------------------------------------------------------------------------- compose


def test_compose_defines_the_stack_services() -> None:
    missing = EXPECTED_SERVICES - set(services())
    assert not missing, f"{COMPOSE_FILE.name}: services missing: {sorted(missing)}"


def test_every_service_has_an_image_or_a_buildable_context() -> None:
    for name, svc in services().items():
        built = build_of(svc)
        if built is None:
            assert svc.get("image"), f"service {name!r}: has neither 'image' nor 'build'"
            continue
        context, dockerfile = built
        assert context.is_dir(), f"service {name!r}: build context {context} does not exist"
        assert context.is_relative_to(ROOT), f"service {name!r}: build context {context} is outside the repo"
        assert dockerfile.is_file(), f"service {name!r}: Dockerfile {dockerfile} does not exist"


def test_images_are_pinned_to_a_tag() -> None:
    for name, svc in services().items():
        image = svc.get("image")
        if image is None or build_of(svc) is not None:
            continue
        tag = image.rpartition("/")[2].partition(":")[2]
        assert tag and tag != "latest", f"service {name!r}: image {image!r} should be pinned to a version tag"


def test_bind_mounted_host_paths_exist_in_repo() -> None:
    for name, svc in services().items():
        for kind, source, target in volume_mounts(svc):
            if kind != "bind":
                continue
            path = (COMPOSE_FILE.parent / source).resolve()
            assert path.is_relative_to(ROOT), f"service {name!r}: bind source {source!r} is outside the repo"
            assert path.exists(), f"service {name!r}: bind source {source!r} (-> {target}) does not exist"


def test_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, svc in services().items():
        for kind, source, _target in volume_mounts(svc):
            if kind == "volume" and source:
                assert source in declared, (
                    f"service {name!r}: named volume {source!r} is not declared under top-level 'volumes'"
                )


def test_ports_are_well_formed() -> None:
    for name, svc in services().items():
        for entry in svc.get("ports") or []:
            host_ip, host_port, container_port, protocol = parse_port(entry)
            where = f"service {name!r}: port {entry!r}"
            assert valid_port_spec(container_port), f"{where}: bad container port {container_port!r}"
            assert not host_port or valid_port_spec(host_port), f"{where}: bad host port {host_port!r}"
            assert protocol in {"tcp", "udp", "sctp"}, f"{where}: bad protocol {protocol!r}"
            if host_ip:
                ipaddress.ip_address(host_ip.strip("[]"))  # raises ValueError with the bad address
        for entry in svc.get("expose") or []:
            spec = str(entry).partition("/")[0]
            assert valid_port_spec(spec), f"service {name!r}: bad 'expose' entry {entry!r}"


def test_host_ports_are_unique() -> None:
    seen: dict[tuple[str, str], str] = {}
    for name, svc in services().items():
        for entry in svc.get("ports") or []:
            _ip, host_port, _container, protocol = parse_port(entry)
            if not host_port:
                continue
            key = (host_port, protocol)
            assert key not in seen, (
                f"host port {host_port}/{protocol} published by both {seen[key]!r} and {name!r}"
            )
            seen[key] = name


def test_depends_on_names_exist() -> None:
    for name, svc in services().items():
        deps = svc.get("depends_on") or []
        for dep in deps:
            assert dep in services(), f"service {name!r}: depends_on unknown service {dep!r}"
            assert dep != name, f"service {name!r}: depends on itself"


def test_service_healthy_dependencies_have_a_healthcheck() -> None:
    for name, svc in services().items():
        deps = svc.get("depends_on") or {}
        if not isinstance(deps, dict):
            continue
        for dep, spec in deps.items():
            if (spec or {}).get("condition") == "service_healthy":
                assert service(dep).get("healthcheck"), (
                    f"service {name!r} waits for {dep!r} to be healthy, but {dep!r} has no healthcheck"
                )


def test_worker_waits_for_kafka_to_be_healthy() -> None:
    deps = service("worker").get("depends_on")
    assert isinstance(deps, dict), "worker: depends_on should be a mapping with a condition for kafka"
    assert (deps.get("kafka") or {}).get("condition") == "service_healthy", (
        "worker: should depend on kafka with condition service_healthy"
    )


# --------------------------------------------------------------------------------------------- kafka


@pytest.mark.parametrize("name", ["kafka", "kafka-secured"])
def test_kafka_listeners_are_consistent(name: str) -> None:
    env = environment(name)
    listeners = listener_map(env["KAFKA_LISTENERS"])
    advertised = listener_map(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    for name in listeners:
        assert name in protocols, f"kafka: listener {name} missing from KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"
    for name, (_host, port) in advertised.items():
        assert name in listeners, f"kafka: advertised listener {name} is not in KAFKA_LISTENERS"
        assert listeners[name][1] == port, (
            f"kafka: {name} advertised on {port}, listens on {listeners[name][1]}"
        )
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners, f"kafka: controller listener {controller} is not in KAFKA_LISTENERS"
    assert controller not in advertised, "kafka: the controller listener must not be advertised"
    voter_port = int(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].rpartition(":")[2])
    assert voter_port == listeners[controller][1], (
        "kafka: quorum voter port differs from the controller listener"
    )


def test_kafka_host_listener_is_published() -> None:
    advertised = listener_map(environment("kafka")["KAFKA_ADVERTISED_LISTENERS"])
    local = [(host, port) for host, port in advertised.values() if host == "localhost"]
    assert local, "kafka: no listener advertised as localhost for clients on the host"
    published = {
        (host_port, container) for _ip, host_port, container, _p in map(parse_port, service("kafka")["ports"])
    }
    for _host, port in local:
        assert (str(port), str(port)) in published, f"kafka: localhost:{port} is advertised but not published"


def test_worker_bootstrap_is_the_kafka_internal_listener() -> None:
    bootstrap = environment("worker").get("CALMRUN_KAFKA__BOOTSTRAP", "")
    advertised = listener_map(environment("kafka")["KAFKA_ADVERTISED_LISTENERS"])
    host, _, port = bootstrap.rpartition(":")
    assert host in services(), f"worker: CALMRUN_KAFKA__BOOTSTRAP host {host!r} is not a compose service"
    assert (host, int(port)) in advertised.values(), (
        f"worker: bootstrap {bootstrap!r} is not one of kafka's advertised listeners {advertised}"
    )


# -------------------------------------------------------------------------------------- worker + CLI


def test_worker_command_is_a_calmrun_cli_verb() -> None:
    command = as_argv(service("worker").get("command")) or last_instruction(worker_dockerfile(), "CMD")
    assert command, "worker: no command (and no CMD in its Dockerfile)"
    verbs = cli_verbs()
    assert command[0] in verbs, f"worker: command {command[0]!r} is not a calmrun CLI verb {sorted(verbs)}"


def test_dockerfile_default_cmd_is_a_calmrun_cli_verb() -> None:
    cmd = last_instruction(worker_dockerfile(), "CMD")
    assert cmd, "Dockerfile: no CMD"
    verbs = cli_verbs()
    assert cmd[0] in verbs, f"Dockerfile: CMD {cmd[0]!r} is not a calmrun CLI verb {sorted(verbs)}"


def test_worker_entrypoint_is_the_calmrun_console_script() -> None:
    entrypoint = as_argv(service("worker").get("entrypoint")) or last_instruction(
        worker_dockerfile(), "ENTRYPOINT"
    )
    assert entrypoint == ["calmrun"], f"worker: entrypoint should be ['calmrun'], got {entrypoint}"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})
    assert "calmrun" in scripts, "pyproject.toml: [project.scripts] does not declare 'calmrun'"


def worker_settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    """calmrun's Settings as the worker container would build them from its CALMRUN_* environment."""
    from calmrun.settings import Settings

    for key in list(os.environ):
        if key.startswith("CALMRUN_"):
            monkeypatch.delenv(key)
    for key, value in environment("worker").items():
        if key.startswith("CALMRUN_"):
            monkeypatch.setenv(key, value)
    return Settings()  # extra="forbid": a misspelt CALMRUN_* variable raises here


def test_worker_environment_is_valid_calmrun_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment("worker")
    settings = worker_settings(monkeypatch)
    assert settings.kafka.bootstrap == env["CALMRUN_KAFKA__BOOTSTRAP"], "worker: bootstrap not picked up"
    assert settings.metrics.port == int(env["CALMRUN_METRICS__PORT"]), "worker: metrics port not picked up"


def test_worker_metrics_listen_beyond_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = worker_settings(monkeypatch)
    assert settings.metrics.port > 0, "worker: metrics are disabled (CALMRUN_METRICS__PORT is 0)"
    assert settings.metrics.host in {"0.0.0.0", "::", ""}, (
        f"worker: metrics bind to {settings.metrics.host!r}; Prometheus in another container cannot scrape"
    )


def test_worker_metrics_port_is_exposed() -> None:
    port = environment("worker").get("CALMRUN_METRICS__PORT", "")
    assert port.isdigit(), "worker: CALMRUN_METRICS__PORT is not set to a port number"
    worker = service("worker")
    exposed = {str(p).partition("/")[0] for p in worker.get("expose") or []}
    exposed |= {parse_port(p)[2] for p in worker.get("ports") or []}
    assert port in exposed, f"worker: metrics port {port} is neither in 'expose' nor in 'ports'"


# ------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_copy_sources_exist() -> None:
    dockerfile = worker_dockerfile()
    context = dockerfile.parent
    sources = copy_sources(dockerfile)
    assert sources, "Dockerfile: no COPY instructions"
    for src, _dest in sources:
        matches = list(context.glob(src)) if any(c in src for c in "*?[") else [context / src]
        assert matches and all(m.exists() for m in matches), (
            f"Dockerfile: COPY source {src!r} does not exist in the build context {context}"
        )


def test_dockerfile_copy_sources_are_not_dockerignored() -> None:
    dockerfile = worker_dockerfile()
    ignore_file = dockerfile.parent / ".dockerignore"
    if not ignore_file.exists():
        return
    patterns = [
        line.strip()
        for line in ignore_file.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]

    def ignored(path: str) -> bool:
        verdict = False
        candidates = [path, *(str(p) for p in Path(path).parents if str(p) != ".")]
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").strip("/")
            pats = {pat, pat.removeprefix("**/")}
            if any(fnmatch.fnmatch(c, p) for c in candidates for p in pats):
                verdict = not negate
        return verdict

    for src, _dest in copy_sources(dockerfile):
        assert not ignored(src.rstrip("/")), f".dockerignore excludes {src!r}, which the Dockerfile COPYs"


def test_dockerfile_copies_the_schemas_symlink_target() -> None:
    """calmrun/schemas is a symlink to ../schemas: the image needs both, at the same relative layout."""
    dockerfile = worker_dockerfile()
    link = dockerfile.parent / "calmrun" / "schemas"
    if not link.is_symlink():
        return
    copied = {src.rstrip("/"): dest.rstrip("/") for src, dest in copy_sources(dockerfile)}
    target = (link.parent / link.readlink()).resolve().relative_to(dockerfile.parent).as_posix()
    assert "calmrun" in copied, "Dockerfile: calmrun/ is not copied"
    assert target in copied, f"Dockerfile: the symlink target {target}/ of calmrun/schemas is not copied"
    in_image = Path(copied["calmrun"]) / link.readlink()
    assert Path(*_normalise(in_image.parts)) == Path(copied[target]), (
        f"Dockerfile: calmrun/schemas -> {link.readlink()} would resolve to {in_image} in the image, "
        f"but {target}/ is copied to {copied[target]}"
    )


def _normalise(parts: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for part in parts:
        if part == "..":
            out.pop()
        elif part != ".":
            out.append(part)
    return out


def test_dockerfile_runs_as_non_root() -> None:
    users = [args for word, args in dockerfile_instructions(worker_dockerfile()) if word == "USER"]
    assert users, "Dockerfile: no USER instruction, the worker would run as root"
    assert users[-1].partition(":")[0] not in {"root", "0"}, f"Dockerfile: final USER is {users[-1]!r}"


# ---------------------------------------------------------------------------------------- Prometheus


def test_prometheus_config_is_mounted_where_it_is_read() -> None:
    target = bind_target("prometheus", PROMETHEUS_FILE.resolve())
    assert target, f"prometheus: {PROMETHEUS_FILE.relative_to(ROOT)} is not bind-mounted"
    args = as_argv(service("prometheus").get("command"))
    config_flags = [a.partition("=")[2] for a in args if a.startswith("--config.file=")]
    expected = config_flags[-1] if config_flags else "/etc/prometheus/prometheus.yml"
    assert target == expected, f"prometheus: config mounted at {target}, but Prometheus reads {expected}"


def test_prometheus_scrapes_the_worker_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    targets = [
        target
        for job in config.get("scrape_configs", [])
        for static in job.get("static_configs", [])
        for target in static.get("targets", [])
    ]
    expected = f"worker:{environment('worker')['CALMRUN_METRICS__PORT']}"
    assert expected in targets, f"prometheus.yml: no scrape target {expected!r} (targets: {targets})"
    for target in targets:
        host = target.rpartition(":")[0]
        assert host in services() or host == "localhost", f"prometheus.yml: target host {host!r} is unknown"


def test_prometheus_scrapes_the_worker_every_5s() -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    port = environment("worker")["CALMRUN_METRICS__PORT"]
    jobs = [
        job
        for job in config.get("scrape_configs", [])
        if any(f"worker:{port}" in s.get("targets", []) for s in job.get("static_configs", []))
    ]
    assert jobs, "prometheus.yml: no job scrapes the worker"
    interval = jobs[0].get("scrape_interval", config.get("global", {}).get("scrape_interval"))
    assert interval == "5s", f"prometheus.yml: worker scrape_interval is {interval!r}, expected '5s'"


# ------------------------------------------------------------------------------------------- Grafana


def test_grafana_provisioning_and_dashboards_are_mounted() -> None:
    for path in (GRAFANA_DATASOURCES, GRAFANA_PROVIDERS, GRAFANA_DASHBOARD):
        assert bind_target("grafana", path.resolve()), (
            f"grafana: {path.relative_to(ROOT)} is not bind-mounted"
        )
    provisioning = bind_target("grafana", GRAFANA_DATASOURCES.parent.parent.resolve())
    assert provisioning == "/etc/grafana/provisioning", (
        f"grafana: provisioning mounted at {provisioning}, Grafana reads /etc/grafana/provisioning"
    )


def test_grafana_datasource_points_at_the_prometheus_service() -> None:
    datasources = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]
    prom = [ds for ds in datasources if ds.get("type") == "prometheus"]
    assert prom, f"{GRAFANA_DATASOURCES.name}: no datasource of type prometheus"
    url = urlsplit(prom[0]["url"])
    assert url.hostname in services(), f"grafana datasource: host {url.hostname!r} is not a compose service"
    container_ports = {parse_port(p)[2] for p in service(url.hostname).get("ports") or []}
    assert str(url.port) in container_ports, (
        f"grafana datasource: port {url.port} not served by {url.hostname}"
    )


def test_grafana_dashboard_provider_reads_the_mounted_dashboards() -> None:
    providers = yaml.safe_load(GRAFANA_PROVIDERS.read_text())["providers"]
    paths = [p["options"]["path"].rstrip("/") for p in providers if p.get("type", "file") == "file"]
    mounted = bind_target("grafana", GRAFANA_DASHBOARD.parent.resolve())
    assert mounted, "grafana: deploy/grafana/dashboards is not bind-mounted"
    assert mounted.rstrip("/") in paths, f"grafana: provider paths {paths} do not include the mount {mounted}"


def test_grafana_dashboard_is_valid_json_model() -> None:
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    assert dashboard.get("title"), "calmrun.json: no title"
    assert dashboard.get("uid"), "calmrun.json: no uid (provisioned dashboards need a stable uid)"
    assert isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] >= 36, (
        f"calmrun.json: schemaVersion {dashboard.get('schemaVersion')!r} is too old or missing"
    )
    panels = dashboard_panels()
    assert panels, "calmrun.json: no panels"
    ids = [p.get("id") for p in panels]
    assert len(ids) == len(set(ids)), f"calmrun.json: duplicate panel ids {ids}"
    for panel in panels:
        assert panel.get("type") == "timeseries", f"panel {panel.get('title')!r}: type {panel.get('type')!r}"
        assert {"h", "w", "x", "y"} <= set(panel.get("gridPos", {})), f"panel {panel.get('title')!r}: gridPos"
        assert panel.get("targets"), f"panel {panel.get('title')!r}: no queries"


def test_grafana_panels_use_the_provisioned_datasource_uid() -> None:
    declared = {ds.get("uid") for ds in yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]}
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    for panel in dashboard_panels():
        title = panel.get("title")
        uid = (panel.get("datasource") or {}).get("uid")
        assert uid in declared, f"panel {title!r}: datasource uid {uid!r} is not provisioned ({declared})"
        for target in panel.get("targets", []):
            t_uid = (target.get("datasource") or {}).get("uid", uid)
            assert t_uid in declared, f"panel {title!r}: query {target.get('refId')} uses uid {t_uid!r}"
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            v_uid = (variable.get("datasource") or {}).get("uid")
            assert v_uid in declared, f"variable {variable.get('name')!r}: datasource uid {v_uid!r}"


def test_grafana_dashboard_covers_the_calmrun_metrics() -> None:
    exprs = " ".join(t.get("expr", "") for p in dashboard_panels() for t in p.get("targets", []))
    missing = [metric for metric in DASHBOARD_METRICS if metric not in exprs]
    assert not missing, f"calmrun.json: no panel queries {missing}"


def _parses(argv: list[str]) -> None:
    """The calmrun CLI accepts ``argv`` (required options present, values of the right type)."""
    import typer.main

    from calmrun.cli import app

    group: Any = typer.main.get_command(app)
    command = group.commands[argv[0]]
    command.make_context(argv[0], list(argv[1:]))


@pytest.mark.parametrize("name", ["worker", "aggregator"])
def test_calmrun_service_commands_parse_and_their_files_ship(name: str) -> None:
    argv = as_argv(service(name).get("command"))
    assert argv, f"{name}: no command"
    _parses(argv)
    copied = {src.rstrip("/") for src, _ in copy_sources(worker_dockerfile())}
    for flag, value in itertools.pairwise(argv):
        if flag in ("-w", "--workflow", "-c", "--config"):
            assert (ROOT / value).is_file(), f"{name}: {flag} {value} is not a file in the repo"
            assert value.split("/")[0] in copied, f"{name}: {value} is not copied into the image"


def test_dockerfile_default_cmd_parses() -> None:
    cmd = last_instruction(worker_dockerfile(), "CMD")
    assert cmd
    _parses(cmd)


# ------------------------------------------------------------------------------------ secured profile

SECURED = ("kafka-secured", "worker-secured", "aggregator-secured")


def test_secured_services_start_only_with_their_profile() -> None:
    for name in SECURED:
        assert service(name).get("profiles") == ["secured"], f"{name}: should be in profile 'secured' only"
    for name in EXPECTED_SERVICES:
        assert not service(name).get("profiles"), f"{name}: the default stack must start without a profile"


def test_secured_listeners_are_sasl_ssl_and_avoid_the_images_ssl_name_check() -> None:
    env = environment("kafka-secured")
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    for name in listener_map(env["KAFKA_ADVERTISED_LISTENERS"]):
        assert protocols[name] == "SASL_SSL", f"kafka-secured: {name} is {protocols[name]}, not SASL_SSL"
        assert "SSL" not in name, f"kafka-secured: listener {name}: the image then wants JKS files"
    for key in ("KAFKA_SSL_KEYSTORE_LOCATION", "KAFKA_SSL_TRUSTSTORE_LOCATION"):
        target = env[key].rpartition("/")[0]
        mounted = {t for _kind, _src, t in volume_mounts(service("kafka-secured"))}
        assert target in mounted, f"kafka-secured: {key} {env[key]} is not in a mounted directory"


def secured_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    from calmrun.settings import Settings

    for key in list(os.environ):
        if key.startswith("CALMRUN_"):
            monkeypatch.delenv(key)
    for key, value in environment(name).items():
        if key.startswith("CALMRUN_"):
            monkeypatch.setenv(key, value)
    return Settings()


@pytest.mark.parametrize("name", ["worker-secured", "aggregator-secured"])
def test_secured_clients_are_valid_settings_with_a_password_reference(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = secured_settings(name, monkeypatch)
    sec = settings.kafka.security
    assert sec.protocol == "SASL_SSL" and sec.sasl.mechanism == "PLAIN"
    assert sec.sasl.password is not None
    password = sec.sasl.password.get_secret_value()
    assert password.startswith("file:/run/secrets/"), f"{name}: the password should be a file: reference"
    assert password.rpartition("/")[2] in service(name).get("secrets", []), f"{name}: secret not mounted"
    assert password.rpartition("/")[2] in (compose().get("secrets") or {}), f"{name}: secret not declared"
    mounted = {t for _kind, _src, t in volume_mounts(service(name))}
    assert str(sec.tls.ca_file).rpartition("/")[0] in mounted, (
        f"{name}: ca_file is not in a mounted directory"
    )
    advertised = listener_map(environment("kafka-secured")["KAFKA_ADVERTISED_LISTENERS"])
    host, _, port = settings.kafka.bootstrap.rpartition(":")
    assert (host, int(port)) in advertised.values(), f"{name}: bootstrap is not a kafka-secured listener"


def test_secured_certificates_are_never_committed() -> None:
    ignore = ROOT / "deploy" / "secured" / "certs" / ".gitignore"
    assert ignore.is_file() and "*" in ignore.read_text().split(), (
        "deploy/secured/certs must ignore its files"
    )
