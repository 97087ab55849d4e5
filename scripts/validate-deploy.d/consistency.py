"""Cross-file consistency checks of compose/, k8s/ and the Dockerfile.

Usage:
  consistency.py --root REPO --render NAME=RENDERED.yaml [...]
  consistency.py --root REPO --render ... --self-test

The first form prints one line per problem and exits 1 if there is any. The
second breaks the files in memory in ways the checks must notice (a typo in a
variable name, a grace period too short, a KEDA trigger on the wrong
consumer, ...) and fails if any break goes unnoticed, so the checks cannot
quietly decay into passing everything.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import re
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from facts import Facts, read_facts
from k8s_checks import Render, check_env_value

Doc = dict[str, Any]


def interpolated_default(value: Any) -> str | None:
    """A compose value with `${VAR:-default}` replaced by its default; None
    when the value depends on the caller's environment only."""
    text = str(value)
    if re.search(r"\$\{[^}]*:\?", text) or re.fullmatch(r"\$\{?\w+\}?", text):
        return None
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", text)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file onto a base file (mappings merge,
    everything else is replaced)."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base.get(key), value) if key in base else value
        return merged
    return override


def seconds(duration: str) -> float:
    """A compose duration (`40s`, `1m30s`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    return sum(float(n) * units[u] for n, u in parts)


def url_port(url: str) -> int | None:
    match = re.search(r"://[^/:]+:(\d+)", url)
    return int(match.group(1)) if match else None


def check_compose(facts: Facts, name: str, project: Doc, report: Callable[[str], None]) -> None:
    """Checks one compose project (a file, or a base merged with an override)."""
    services = project.get("services", {})
    stages = facts.dockerfile_stages()
    for service_name, service in services.items():
        where = f"{name}: service {service_name}"
        build = service.get("build")
        if isinstance(build, dict):
            if build.get("target") and build["target"] not in stages:
                report(f"{where}: build target {build['target']!r} is not a Dockerfile stage {sorted(stages)}")
            context = (facts.root / "compose" / build.get("context", ".")).resolve()
            if not (context / build.get("dockerfile", "Dockerfile")).exists():
                report(f"{where}: build context {build.get('context')!r} has no {build.get('dockerfile', 'Dockerfile')}")
        for dependency, condition in (service.get("depends_on") or {}).items():
            if isinstance(condition, dict) and condition.get("condition") == "service_healthy":
                if "healthcheck" not in services.get(dependency, {}):
                    report(f"{where}: waits for {dependency} to be healthy, which has no healthcheck")
        named_targets = [str(v).split(":")[1] for v in service.get("volumes", [])
                         if not str(v).startswith((".", "/"))]
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/")):
                continue
            path = facts.root / "compose" / source
            if not path.exists():
                report(f"{where}: mounts {source}, which does not exist")
                continue
            # A server configuration must keep its data on a named volume,
            # or `docker compose down` + `up` loses it.
            store = re.search(r'(?m)^\s*store_dir:\s*"?([^"\s]+)', path.read_text()) if path.is_file() else None
            if store and not any(store.group(1).startswith(t.rstrip("/") + "/") or store.group(1) == t
                                 for t in named_targets):
                report(f"{where}: {source} keeps data in {store.group(1)}, which is on no named volume "
                       f"({named_targets})")
        command = service.get("command") or []
        if not command or command[0] not in facts.bin_names:
            continue
        env = {k: interpolated_default(v) for k, v in (service.get("environment") or {}).items()}
        for var, value in env.items():
            if not facts.env_name_known(var):
                report(f"{where}: sets {var}, which no ClaudeCluster process reads")
            elif value is not None and value != "":
                check_env_value(facts, var, value, lambda m: report(f"{where}: {m}"))
        for var in ("NATS_URL", "REDIS_URL"):
            host = re.match(r"[a-z]+://(?:[^@/]*@)?([^:/]+)", env.get(var) or "")
            if host and host.group(1) not in services:
                report(f"{where}: {var} names host {host.group(1)!r}, which is not a service")
        health = " ".join(map(str, service.get("healthcheck", {}).get("test", [])))
        health_port = url_port(health)
        if "/health" not in health:
            report(f"{where}: healthcheck must call the /health endpoint")
        if command[0] == "claudecluster-consumer":
            port = env.get("WORKER_PORT") or env.get("PORT")
            if service.get("ports"):
                report(f"{where}: publishes host ports, so `--scale consumer=N` would collide")
            if "container_name" in service:
                report(f"{where}: sets container_name, so it cannot be scaled")
            grace = env.get("SHUTDOWN_GRACE_MS")
            if grace is None:
                report(f"{where}: must set SHUTDOWN_GRACE_MS so stop_grace_period can be checked against it")
            elif seconds(service.get("stop_grace_period", "10s")) * 1000 <= int(grace):
                report(f"{where}: stop_grace_period {service.get('stop_grace_period', '10s')} must exceed "
                       f"SHUTDOWN_GRACE_MS={grace}")
            if env.get("TASK_EXECUTOR") == "claude" and isinstance(build, dict) and build.get("target") != "claude":
                report(f"{where}: TASK_EXECUTOR=claude needs the image built with target 'claude'")
        else:
            port = env.get("PORT") or env.get("MCP_SERVER_PORT")
            published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
            if port not in published:
                report(f"{where}: PORT={port} is not the container side of its ports {service.get('ports')}")
        if port is None or health_port != int(port):
            report(f"{where}: healthcheck port {health_port} is not the port it listens on ({port})")


def ignored_by_docker(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` out of the build context: the last
    matching pattern wins, `!` re-includes, a directory takes its contents
    with it, and `**/` matches at any depth."""
    parts = path.split("/")
    # A pattern matching any leading directory excludes the path too.
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    # For `**/x`: every run of consecutive components, wherever it starts.
    runs = ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    ignored = False
    for raw in patterns:
        pattern = raw.removeprefix("!").strip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(run, pattern[3:]) for run in runs)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)
        if hit:
            ignored = not raw.startswith("!")
    return ignored


def check_dockerfile(facts: Facts, report: Callable[[str], None]) -> None:
    text = facts.dockerfile
    packages = set(re.findall(r"--package\s+(\S+)", text))
    for package in packages - facts.package_names:
        report(f"Dockerfile: --package {package} is not a workspace package")
    copied = set(re.findall(r"target/release/([\w-]+)", text))
    for binary in copied - facts.bin_names:
        report(f"Dockerfile: copies target/release/{binary}, which the workspace does not build")
    for binary in {"claudecluster", "claudecluster-producer", "claudecluster-consumer"} - copied:
        report(f"Dockerfile: the image lacks the {binary} binary")
    env_block = " ".join(re.findall(r"(?ms)^ENV\s+(.*?)(?<!\\)$", text))
    for name in re.findall(r"([A-Z][A-Z0-9_]*)=", env_block):
        if not facts.env_name_known(name):
            report(f"Dockerfile: ENV {name} is read by no ClaudeCluster process")
    needed = {"Cargo.toml", "Cargo.lock", *facts.member_dirs, *sorted(facts.embedded_files)}
    for path in sorted(needed):
        if ignored_by_docker(path, facts.dockerignore):
            report(f".dockerignore: excludes {path}, which the build needs")


def load_compose(root: Path) -> dict[str, Doc]:
    """Every compose project: each file, and each override merged onto the base."""
    base_path = root / "compose/docker-compose.yml"
    base = yaml.safe_load(base_path.read_text())
    projects = {"compose/docker-compose.yml": base}
    for override in sorted((root / "compose").glob("docker-compose.*.yml")):
        projects[f"compose/docker-compose.yml+{override.name}"] = merge(base, yaml.safe_load(override.read_text()))
    return projects


def run_checks(facts: Facts, compose: dict[str, Doc], renders: dict[str, list[Doc]]) -> list[str]:
    errors: list[str] = []
    for name, project in compose.items():
        check_compose(facts, name, project, errors.append)
    for name, docs in renders.items():
        Render(name, docs, facts, errors.append).check_all()
    check_dockerfile(facts, errors.append)
    return errors


# --------------------------------------------------------------------------
# Self-test: each break must be reported with the given words.

def _k8s(kind: str, name: str, fn: Callable[[Doc], None]) -> Callable[[dict, dict, Facts], None]:
    def apply(compose: dict, renders: dict, facts: Facts) -> None:
        for docs in renders.values():
            for doc in docs:
                if doc and doc.get("kind") == kind and doc["metadata"]["name"].startswith(name):
                    fn(doc)
    return apply


def _container(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]["containers"][0]


def _compose_service(service: str, fn: Callable[[Doc], None]) -> Callable[[dict, dict, Facts], None]:
    def apply(compose: dict, renders: dict, facts: Facts) -> None:
        fn(compose["compose/docker-compose.yml"]["services"][service])
    return apply


BREAKS: list[tuple[str, Callable[[dict, dict, Facts], None], str]] = [
    ("misspelt variable in the ConfigMap",
     _k8s("ConfigMap", "claudecluster-config", lambda d: d["data"].update(WORKER_CONCURENCY="5")),
     "WORKER_CONCURENCY"),
    ("grace period below SHUTDOWN_GRACE_MS",
     _k8s("Deployment", "claudecluster-worker", lambda d: d["spec"]["template"]["spec"].update(
         terminationGracePeriodSeconds=10)), "terminationGracePeriodSeconds"),
    ("unknown executor", _k8s("ConfigMap", "claudecluster-config", lambda d: d["data"].update(TASK_EXECUTOR="cluade")),
     "TASK_EXECUTOR"),
    ("KEDA trigger on a consumer nobody pulls from",
     _k8s("ScaledObject", "claudecluster-worker",
          lambda d: d["spec"]["triggers"][0]["metadata"].update(consumer="claudecluster-worker-high")),
     "consumers"),
    ("KEDA endpoint in another namespace",
     _k8s("ScaledObject", "claudecluster-worker", lambda d: d["spec"]["triggers"][1]["metadata"].update(
         natsServerMonitoringEndpoint="nats.default.svc.cluster.local:8222")), "namespace"),
    ("unknown KEDA metadata key",
     _k8s("ScaledObject", "claudecluster-worker", lambda d: d["spec"]["triggers"][2]["metadata"].update(lagTreshold="5")),
     "lagTreshold"),
    ("formula naming a missing trigger",
     _k8s("ScaledObject", "claudecluster-worker",
          lambda d: d["spec"]["advanced"]["scalingModifiers"].update(formula="high + normal")), "formula"),
    ("Service selecting nothing",
     _k8s("Service", "claudecluster-worker", lambda d: d["spec"].update(selector={"app": "worker"})), "matches no pod"),
    ("probe on an undeclared port",
     _k8s("Deployment", "claudecluster-mcp-server",
          lambda d: _container(d)["readinessProbe"]["httpGet"].update(port="metrics")), "readinessProbe port"),
    ("writable root file system",
     _k8s("Deployment", "claudecluster-mcp-server",
          lambda d: _container(d)["securityContext"].update(readOnlyRootFilesystem=False)), "readOnlyRootFilesystem"),
    ("work dir without a volume",
     _k8s("Deployment", "claudecluster-worker",
          lambda d: _container(d)["volumeMounts"].pop(0)), "WORK_DIR"),
    ("replicas fighting the autoscaler",
     _k8s("Deployment", "claudecluster-mcp-server", lambda d: d["spec"].update(replicas=3)), "spec.replicas"),
    ("unrewritten reference to a generated ConfigMap",
     _k8s("Deployment", "claudecluster-worker",
          lambda d: _container(d)["envFrom"][0]["configMapRef"].update(name="claudecluster-config")), "not rewritten"),
    ("NATS_URL naming no Service",
     _k8s("ConfigMap", "claudecluster-config", lambda d: d["data"].update(NATS_URL="nats://nats-0:4222")), "NATS_URL"),
    ("NATS volume smaller than JetStream's file store",
     _k8s("StatefulSet", "nats", lambda d: d["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"].update(
         storage="1Gi")), "max_file_store"),
    ("compose consumer publishing a host port",
     _compose_service("consumer", lambda s: s.update(ports=["3001:3001"])), "--scale"),
    ("compose stop_grace_period too short",
     _compose_service("consumer", lambda s: s.update(stop_grace_period="5s")), "stop_grace_period"),
    ("compose healthcheck on the wrong port",
     _compose_service("producer", lambda s: s["healthcheck"].update(
         test=["CMD", "curl", "-f", "http://127.0.0.1:3001/health"])), "healthcheck port"),
    ("compose misspelt variable",
     _compose_service("consumer", lambda s: s["environment"].update(TASK_TIMEOUT_MS="1")), "TASK_TIMEOUT_MS"),
    ("compose mounting a file that does not exist",
     _compose_service("nats", lambda s: s["volumes"].__setitem__(
         0, "../broker-config/nats/nats.conf:/etc/nats/nats-server.conf:ro")), "does not exist"),
    ("compose NATS data outside its volume",
     _compose_service("nats", lambda s: s["volumes"].__setitem__(1, "nats-data:/var/lib/nats")), "named volume"),
    ("compose build target that does not exist",
     _compose_service("producer", lambda s: s["build"].update(target="prod")), "build target"),
    (".dockerignore hiding the lock file",
     lambda compose, renders, facts: facts.dockerignore.append("Cargo.lock"), "Cargo.lock"),
    ("Dockerfile building a package that does not exist",
     lambda compose, renders, facts: setattr(facts, "dockerfile", facts.dockerfile.replace(
         "--package claudecluster-producer", "--package claudecluster-intake")), "claudecluster-intake"),
]


def self_test(facts: Facts, compose: dict, renders: dict) -> list[str]:
    failures = []
    for description, apply, words in BREAKS:
        broken_facts = copy.deepcopy(facts)
        broken_compose, broken_renders = copy.deepcopy(compose), copy.deepcopy(renders)
        apply(broken_compose, broken_renders, broken_facts)
        errors = run_checks(broken_facts, broken_compose, broken_renders)
        if not any(words in e for e in errors):
            failures.append(f"self-test: '{description}' went unnoticed (expected a problem mentioning {words!r})")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--render", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    root = args.root.resolve()
    facts = read_facts(root)
    compose = load_compose(root)
    renders = {}
    for item in args.render:
        name, _, path = item.partition("=")
        renders[name] = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    if args.self_test:
        if not renders:
            print("self-test: needs at least one --render", file=sys.stderr)
            return 2
        problems = self_test(facts, compose, renders)
        for problem in problems:
            print(problem)
        if not problems:
            print(f"self-test: all {len(BREAKS)} deliberate breaks were reported")
    else:
        problems = run_checks(facts, compose, renders)
        for problem in problems:
            print(problem)
        if not problems:
            print(f"consistency: {len(compose)} compose project(s), {len(renders)} render(s): no problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
