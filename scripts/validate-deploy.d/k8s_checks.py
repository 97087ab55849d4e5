"""Checks of one rendered Kubernetes overlay against itself and the code.

Schema validators see one object at a time. These checks look across
objects (a Service that selects no pod, a Secret reference kustomize did not
rewrite, a KEDA trigger naming a consumer the workers do not use) and across
files (an environment variable no process reads, a grace period shorter than
the worker's shutdown grace).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from facts import Facts

Doc = dict[str, Any]
Report = Callable[[str], None]

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
# Objects created outside of git (k8s/README.md says how).
EXTERNAL_SECRETS = {
    "claudecluster-secrets", "claudecluster-env", "claudecluster-tls", "claudecluster-basic-auth",
}
# Keys of the KEDA ScaledObject parts used here (KEDA 2.x CRD); the trigger
# metadata is a free-form map in the CRD, so its keys are listed too.
SCALEDOBJECT_SPEC_KEYS = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
    "triggers",
}
ADVANCED_KEYS = {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"}
MODIFIER_KEYS = {"formula", "target", "activationTarget", "metricType"}
MODIFIER_METRIC_TYPES = {"AverageValue", "Value"}
TRIGGER_KEYS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
JETSTREAM_REQUIRED = {"natsServerMonitoringEndpoint", "stream", "consumer", "lagThreshold"}
JETSTREAM_OPTIONAL = {"account", "activationLagThreshold", "useHttps"}
MIB = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory/storage quantity in MiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(quantity))
    if not match:
        raise ValueError(f"unreadable quantity {quantity!r}")
    number, unit = match.groups()
    return float(number) * (MIB[unit] if unit else 1 / 2**20)


def pod_spec(doc: Doc) -> Doc | None:
    """The pod spec of a workload, or None."""
    if doc.get("kind") in WORKLOAD_KINDS:
        return doc.get("spec", {}).get("template", {}).get("spec")
    return None


def pod_labels(doc: Doc) -> dict[str, str]:
    return doc.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}) or {}


def port_keys(container: Doc) -> set[str | int]:
    """How a Service or probe may name the container's ports: name or number."""
    ports = container.get("ports", [])
    return {p["name"] for p in ports if "name" in p} | {p["containerPort"] for p in ports}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


class Render:
    """One rendered overlay: its objects, indexed."""

    def __init__(self, name: str, docs: list[Doc], facts: Facts, report: Report):
        self.name = name
        self.docs = [d for d in docs if isinstance(d, dict) and d.get("kind")]
        self.facts = facts
        self.report = report
        self.by_kind: dict[str, dict[str, Doc]] = {}
        for doc in self.docs:
            self.by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc

    def get(self, kind: str, name: str) -> Doc | None:
        return self.by_kind.get(kind, {}).get(name)

    def err(self, where: str, message: str) -> None:
        self.report(f"{self.name}: {where}: {message}")

    def workloads(self) -> list[Doc]:
        return [d for d in self.docs if pod_spec(d) is not None]

    def claudecluster_containers(self) -> list[tuple[Doc, Doc]]:
        """(workload, container) for every container running a workspace binary."""
        found = []
        for workload in self.workloads():
            for container in pod_spec(workload).get("containers", []):
                argv = (container.get("command") or []) + (container.get("args") or [])
                if argv and argv[0] in self.facts.bin_names:
                    found.append((workload, container))
        return found

    def effective_env(self, container: Doc) -> dict[str, str | None]:
        """The container's environment: envFrom ConfigMaps, then env (None
        for values from a Secret or the downward API)."""
        env: dict[str, str | None] = {}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef")
            if ref and (cm := self.get("ConfigMap", ref["name"])):
                env.update(cm.get("data", {}))
        for var in container.get("env", []):
            env[var["name"]] = var.get("value")
        return env

    # ------------------------------------------------------------------
    def check_all(self) -> None:
        self.check_namespace()
        self.check_references()
        self.check_security()
        self.check_services()
        self.check_claudecluster_env()
        self.check_worker()
        self.check_intake()
        self.check_autoscaling()
        self.check_scaledobjects()
        self.check_nats_config()

    def check_namespace(self) -> None:
        namespaces = list(self.by_kind.get("Namespace", {}))
        if len(namespaces) != 1:
            self.err("Namespace", f"expected exactly one Namespace object, found {namespaces}")
            return
        for doc in self.docs:
            if doc["kind"] in {"Namespace", "ClusterRole", "ClusterRoleBinding"}:
                continue
            if doc["metadata"].get("namespace") != namespaces[0]:
                self.err(f"{doc['kind']}/{doc['metadata']['name']}",
                         f"is not in namespace {namespaces[0]!r}")

    def _check_ref(self, where: str, kind: str, name: str) -> None:
        if self.get(kind, name):
            return
        hashed = [n for n in self.by_kind.get(kind, {}) if re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", n)]
        if hashed:
            self.err(where, f"refers to {kind} {name!r} but the render generates {hashed[0]!r}: "
                            "the reference was not rewritten (namespace mismatch?)")
        elif not (kind == "Secret" and name in EXTERNAL_SECRETS):
            self.err(where, f"refers to {kind} {name!r}, which is neither rendered nor a documented external Secret")

    def check_references(self) -> None:
        for workload in self.workloads():
            where = f"{workload['kind']}/{workload['metadata']['name']}"
            spec = pod_spec(workload)
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                for source in container.get("envFrom", []):
                    if ref := source.get("configMapRef"):
                        self._check_ref(where, "ConfigMap", ref["name"])
                    if ref := source.get("secretRef"):
                        self._check_ref(where, "Secret", ref["name"])
                for var in container.get("env", []):
                    value_from = var.get("valueFrom", {})
                    if ref := value_from.get("secretKeyRef"):
                        self._check_ref(where, "Secret", ref["name"])
                        if (secret := self.get("Secret", ref["name"])) and ref["key"] not in {
                            **secret.get("data", {}), **secret.get("stringData", {})}:
                            self.err(where, f"Secret {ref['name']!r} has no key {ref['key']!r}")
                    if ref := value_from.get("configMapKeyRef"):
                        self._check_ref(where, "ConfigMap", ref["name"])
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    self._check_ref(where, "ConfigMap", volume["configMap"]["name"])
                if "secret" in volume:
                    self._check_ref(where, "Secret", volume["secret"]["secretName"])
            account = spec.get("serviceAccountName")
            if account and not self.get("ServiceAccount", account):
                self.err(where, f"uses ServiceAccount {account!r}, which is not rendered")
        for ingress in self.by_kind.get("Ingress", {}).values():
            for tls in ingress["spec"].get("tls", []):
                self._check_ref(f"Ingress/{ingress['metadata']['name']}", "Secret", tls["secretName"])
            auth = ingress["metadata"].get("annotations", {}).get("nginx.ingress.kubernetes.io/auth-secret")
            if auth:
                self._check_ref(f"Ingress/{ingress['metadata']['name']}", "Secret", auth)

    def check_security(self) -> None:
        """The namespace enforces the "restricted" Pod Security Standard."""
        uid = self.facts.image_uid()
        for workload in self.workloads():
            where = f"{workload['kind']}/{workload['metadata']['name']}"
            spec = pod_spec(workload)
            pod_sc = spec.get("securityContext", {})
            for container in spec.get("containers", []):
                sc = container.get("securityContext", {})
                cwhere = f"{where} container {container['name']}"
                if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))):
                    self.err(cwhere, "must set runAsNonRoot: true")
                if sc.get("allowPrivilegeEscalation") is not False:
                    self.err(cwhere, "must set allowPrivilegeEscalation: false")
                if sc.get("readOnlyRootFilesystem") is not True:
                    self.err(cwhere, "must set readOnlyRootFilesystem: true")
                if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                    self.err(cwhere, "must drop ALL capabilities")
                seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
                if seccomp.get("type") not in {"RuntimeDefault", "Localhost"}:
                    self.err(cwhere, "needs seccompProfile RuntimeDefault")
            for container in (c for w, c in self.claudecluster_containers() if w is workload):
                run_as = container.get("securityContext", {}).get("runAsUser", pod_sc.get("runAsUser"))
                if uid is not None and run_as != uid:
                    self.err(where, f"runs as user {run_as}, the image's user is {uid}")
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                if "/tmp" not in mounts:
                    self.err(where, "has a read-only root file system but no writable /tmp mount")

    def check_services(self) -> None:
        for service in self.by_kind.get("Service", {}).values():
            where = f"Service/{service['metadata']['name']}"
            selector = service["spec"].get("selector", {})
            pods = [w for w in self.workloads() if selects(selector, pod_labels(w))]
            if not pods:
                self.err(where, f"selector {selector} matches no pod template")
                continue
            container_ports = set()
            for pod in pods:
                for container in pod_spec(pod)["containers"]:
                    container_ports |= port_keys(container)
            for port in service["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                if target not in container_ports:
                    self.err(where, f"targetPort {target!r} is not a port of the selected pods")
        for workload in self.workloads():
            for container in pod_spec(workload)["containers"]:
                names = port_keys(container)
                for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                    port = container.get(probe, {}).get("httpGet", {}).get("port")
                    if port is not None and port not in names:
                        self.err(f"{workload['kind']}/{workload['metadata']['name']}",
                                 f"{probe} port {port!r} is not a container port")
        for ingress in self.by_kind.get("Ingress", {}).values():
            for rule in ingress["spec"].get("rules", []):
                for path in rule.get("http", {}).get("paths", []):
                    backend = path["backend"]["service"]
                    service = self.get("Service", backend["name"])
                    ports = {p["port"] for p in service["spec"]["ports"]} if service else set()
                    if backend["port"].get("number") not in ports:
                        self.err(f"Ingress/{ingress['metadata']['name']}",
                                 f"backend {backend['name']}:{backend['port']} is not a rendered Service port")

    def check_claudecluster_env(self) -> None:
        for workload, container in self.claudecluster_containers():
            where = f"{workload['kind']}/{workload['metadata']['name']}"
            for name, value in self.effective_env(container).items():
                if not self.facts.env_name_known(name):
                    self.err(where, f"sets {name}, which no ClaudeCluster process reads")
                elif value is not None:
                    check_env_value(self.facts, name, value, lambda m: self.err(where, m))
            for name in ("NATS_URL", "REDIS_URL"):
                url = self.effective_env(container).get(name)
                if url:
                    self._check_service_url(where, name, url)

    def _check_service_url(self, where: str, name: str, url: str) -> None:
        match = re.match(r"[a-z]+://(?:[^@/]*@)?([^:/]+)(?::(\d+))?", url)
        if not match:
            self.err(where, f"{name}={url!r} is not a URL")
            return
        host, port = match.group(1), match.group(2)
        if "." in host and not re.search(r"\.svc(\.cluster\.local)?$", host):
            return  # an external (managed) service
        service = self.get("Service", host.split(".")[0])
        if not service:
            self.err(where, f"{name} names host {host!r}, which is not a rendered Service")
        elif port and int(port) not in {p["port"] for p in service["spec"]["ports"]}:
            self.err(where, f"{name} uses port {port}, which Service {host!r} does not expose")

    def _workers(self) -> list[tuple[Doc, Doc]]:
        return [(w, c) for w, c in self.claudecluster_containers()
                if ((c.get("command") or []) + (c.get("args") or []))[0] == "claudecluster-consumer"]

    def check_worker(self) -> None:
        workers = self._workers()
        if not workers:
            self.err("workers", "no container runs claudecluster-consumer")
        for workload, container in workers:
            where = f"{workload['kind']}/{workload['metadata']['name']}"
            env = self.effective_env(container)
            spec = pod_spec(workload)
            http = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}.get("http")
            port = env.get("WORKER_PORT") or env.get("PORT")
            if port is None or http is None or int(port) != http:
                self.err(where, f"listens on WORKER_PORT/PORT={port} but its http port is {http}")
            grace = env.get("SHUTDOWN_GRACE_MS")
            if grace is None:
                self.err(where, "must set SHUTDOWN_GRACE_MS so the pod's grace period can be checked against it")
            elif spec.get("terminationGracePeriodSeconds", 30) * 1000 <= int(grace):
                self.err(where, f"terminationGracePeriodSeconds {spec.get('terminationGracePeriodSeconds', 30)} "
                                f"must exceed SHUTDOWN_GRACE_MS={grace}")
            work_dir = env.get("WORK_DIR")
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            volume = volumes.get(mounts.get(work_dir, ""), {})
            if "emptyDir" not in volume:
                self.err(where, f"WORK_DIR={work_dir} must be an emptyDir mount (the root file system is read-only)")
                continue
            limit = volume["emptyDir"].get("sizeLimit")
            concurrency = int(env.get("WORKER_CONCURRENCY") or 5)
            quota = int(env.get("DISK_QUOTA_MB") or 0)
            if limit is None or mebibytes(limit) < concurrency * quota:
                self.err(where, f"work volume sizeLimit {limit} is below WORKER_CONCURRENCY x DISK_QUOTA_MB "
                                f"= {concurrency * quota} MiB")
            for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
                if container.get(probe, {}).get("httpGet", {}).get("path") != path:
                    self.err(where, f"{probe} must GET {path}")

    def check_intake(self) -> None:
        intakes = [(w, c) for w, c in self.claudecluster_containers()
                   if ((c.get("command") or []) + (c.get("args") or []))[0] == "claudecluster-producer"]
        if not intakes:
            self.err("intake", "no container runs claudecluster-producer")
        hosts = {rule["host"] for i in self.by_kind.get("Ingress", {}).values() for rule in i["spec"].get("rules", [])}
        for ingress in self.by_kind.get("Ingress", {}).values():
            tls_hosts = {h for t in ingress["spec"].get("tls", []) for h in t.get("hosts", [])}
            if tls_hosts and tls_hosts != {r["host"] for r in ingress["spec"]["rules"]}:
                self.err(f"Ingress/{ingress['metadata']['name']}", f"TLS hosts {tls_hosts} differ from rule hosts")
        for workload, container in intakes:
            where = f"{workload['kind']}/{workload['metadata']['name']}"
            env = self.effective_env(container)
            http = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}.get("http")
            port = env.get("PORT") or env.get("MCP_SERVER_PORT")
            if port is None or http is None or int(port) != http:
                self.err(where, f"listens on PORT={port} but its http port is {http}")
            allowed = set(re.split(r"[,\s]+", env.get("ALLOWED_HOSTS") or "")) - {""}
            missing = hosts - allowed
            if missing and "*" not in allowed:
                self.err(where, f"ALLOWED_HOSTS lacks Ingress host(s) {sorted(missing)}: MCP would answer 403")
            for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
                if container.get(probe, {}).get("httpGet", {}).get("path") != path:
                    self.err(where, f"{probe} must GET {path}")

    def check_autoscaling(self) -> None:
        scaled = set()
        for hpa in self.by_kind.get("HorizontalPodAutoscaler", {}).values():
            ref = hpa["spec"]["scaleTargetRef"]
            scaled.add((ref["kind"], ref["name"]))
            if not self.get(ref["kind"], ref["name"]):
                self.err(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}", f"targets missing {ref['kind']}/{ref['name']}")
        for so in self.by_kind.get("ScaledObject", {}).values():
            ref = so["spec"]["scaleTargetRef"]
            scaled.add((ref.get("kind", "Deployment"), ref["name"]))
        for kind, name in scaled:
            workload = self.get(kind, name)
            if workload and "replicas" in workload["spec"]:
                self.err(f"{kind}/{name}", "sets spec.replicas although an autoscaler owns it (every apply would reset it)")
        for pdb in self.by_kind.get("PodDisruptionBudget", {}).values():
            selector = pdb["spec"]["selector"].get("matchLabels", {})
            if not any(selects(selector, pod_labels(w)) for w in self.workloads()):
                self.err(f"PodDisruptionBudget/{pdb['metadata']['name']}", "selects no pod template")

    def check_scaledobjects(self) -> None:
        objects = list(self.by_kind.get("ScaledObject", {}).values())
        if not objects:
            self.err("ScaledObject", "the workers have no KEDA ScaledObject")
        for so in objects:
            self._check_scaledobject(so)

    def _check_scaledobject(self, so: Doc) -> None:
        where = f"ScaledObject/{so['metadata']['name']}"
        spec = so["spec"]
        for path, keys, allowed in (
            ("spec", spec, SCALEDOBJECT_SPEC_KEYS),
            ("spec.advanced", spec.get("advanced", {}), ADVANCED_KEYS),
            ("spec.advanced.scalingModifiers", spec.get("advanced", {}).get("scalingModifiers", {}), MODIFIER_KEYS),
        ):
            for key in set(keys) - allowed:
                self.err(where, f"unknown field {path}.{key}")
        target = self.get(spec["scaleTargetRef"].get("kind", "Deployment"), spec["scaleTargetRef"]["name"])
        if not target:
            self.err(where, f"targets missing workload {spec['scaleTargetRef']['name']!r}")
            return
        container = next((c for w, c in self._workers() if w is target), None)
        if container is None:
            self.err(where, "does not target the worker Deployment")
            return
        concurrency = self.effective_env(container).get("WORKER_CONCURRENCY") or "5"
        if spec.get("minReplicaCount", 0) < 1:
            self.err(where, "minReplicaCount must be >= 1: KEDA reads a missing consumer as the whole stream")
        triggers = spec.get("triggers", [])
        consumers = set()
        for trigger in triggers:
            for key in set(trigger) - TRIGGER_KEYS:
                self.err(where, f"unknown trigger field {key!r}")
            if trigger.get("type") != "nats-jetstream":
                self.err(where, f"trigger type {trigger.get('type')!r} is not nats-jetstream")
                continue
            meta = trigger.get("metadata", {})
            for key in JETSTREAM_REQUIRED - set(meta):
                self.err(where, f"trigger {trigger.get('name')!r} lacks metadata.{key}")
            for key in set(meta) - JETSTREAM_REQUIRED - JETSTREAM_OPTIONAL:
                self.err(where, f"trigger {trigger.get('name')!r} has unknown metadata.{key}")
            consumers.add(meta.get("consumer"))
            stream = self.facts.broker_stream or self.facts.stream
            if meta.get("stream") != stream:
                self.err(where, f"trigger stream {meta.get('stream')!r} is not the task stream {stream!r}")
            if not str(meta.get("lagThreshold", "")).isdigit():
                self.err(where, f"lagThreshold {meta.get('lagThreshold')!r} is not a whole number")
            self._check_monitoring_endpoint(where, so, meta.get("natsServerMonitoringEndpoint", ""))
        expected = self.facts.band_consumers()
        if self.facts.broker_consumers and self.facts.broker_consumers != expected:
            self.err(where, f"broker-config consumers {sorted(self.facts.broker_consumers)} differ from the "
                            f"code's {sorted(expected)}")
        if consumers != expected:
            self.err(where, f"triggers watch consumers {sorted(c or '' for c in consumers)}, "
                            f"the workers pull from {sorted(expected)}")
        modifiers = spec.get("advanced", {}).get("scalingModifiers")
        if modifiers:
            names = {t.get("name") for t in triggers}
            used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", modifiers.get("formula", "")))
            if used != names:
                self.err(where, f"formula uses {sorted(used)} but the triggers are named {sorted(n or '' for n in names)}")
            if modifiers.get("metricType", "AverageValue") not in MODIFIER_METRIC_TYPES:
                self.err(where, f"scalingModifiers.metricType {modifiers.get('metricType')!r} is not one of "
                                f"{sorted(MODIFIER_METRIC_TYPES)}")
            if str(modifiers.get("target")) != str(concurrency):
                self.err(where, f"scalingModifiers.target {modifiers.get('target')} should equal "
                                f"WORKER_CONCURRENCY={concurrency} (one worker's share of the lag)")

    def _check_monitoring_endpoint(self, where: str, so: Doc, endpoint: str) -> None:
        match = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?:(\d+)", endpoint)
        if not match:
            self.err(where, f"natsServerMonitoringEndpoint {endpoint!r} is not <service>.<namespace>.svc...:<port> "
                            "(KEDA runs in its own namespace and needs the full name)")
            return
        service_name, namespace, port = match.groups()
        if namespace != so["metadata"].get("namespace"):
            self.err(where, f"natsServerMonitoringEndpoint points at namespace {namespace!r}, "
                            f"the objects are in {so['metadata'].get('namespace')!r}")
        service = self.get("Service", service_name)
        if not service or int(port) not in {p["port"] for p in service["spec"]["ports"]}:
            self.err(where, f"natsServerMonitoringEndpoint {endpoint!r} is not a rendered Service port")

    def check_nats_config(self) -> None:
        config = self.get("ConfigMap", "nats-config")
        if not config:
            return
        conf = config["data"].get("nats.conf", "")
        match = re.search(r"(?m)^\s*max_payload:\s*(\S+)", conf)
        if self.facts.broker_max_payload and (not match or match.group(1) != self.facts.broker_max_payload):
            self.err("ConfigMap/nats-config", f"max_payload must match broker-config/nats/nats-server.conf "
                                              f"({self.facts.broker_max_payload})")
        store = re.search(r"(?m)^\s*max_file_store:\s*(\d+)([KMGT])B?\s*$", conf)
        nats = self.get("StatefulSet", "nats")
        if not store or not nats:
            self.err("ConfigMap/nats-config", "needs max_file_store (with a K/M/G/T unit) and the nats StatefulSet")
            return
        store_mib = int(store.group(1)) * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[store.group(2)]
        for claim in nats["spec"].get("volumeClaimTemplates", []):
            size = claim["spec"]["resources"]["requests"]["storage"]
            if store_mib >= mebibytes(size):
                self.err("StatefulSet/nats", f"volume {claim['metadata']['name']} ({size}) must be larger than "
                                             f"JetStream's max_file_store ({store.group(0).split(':')[1].strip()})")


def check_env_value(facts: Facts, name: str, value: str, err: Callable[[str], None]) -> None:
    """Checks a literal value of a ClaudeCluster setting."""
    numeric = {"PORT", "WORKER_PORT", "MCP_SERVER_PORT", "WORKER_CONCURRENCY", "MAX_CONCURRENT_TASKS",
               "TASK_TIMEOUT", "SHUTDOWN_GRACE_MS", "HEALTH_CHECK_INTERVAL", "MAX_MEMORY_MB", "DISK_QUOTA_MB",
               "MAX_BODY_BYTES", "REQUEST_TIMEOUT_MS", "MAX_CONCURRENT_REQUESTS", "RESULT_TTL_SECS"}
    if name in numeric and not re.fullmatch(r"\d+", str(value)):
        err(f"{name}={value!r} must be a whole number")
    if name == "MAX_CPU_CORES" and not re.fullmatch(r"\d+(\.\d+)?", str(value)):
        err(f"{name}={value!r} must be a number")
    if name == "TASK_EXECUTOR" and value not in facts.executor_kinds:
        err(f"TASK_EXECUTOR={value!r} is not one of {sorted(facts.executor_kinds)}")
    if name == "LOG_FORMAT" and value not in facts.log_formats:
        err(f"LOG_FORMAT={value!r} is not one of {sorted(facts.log_formats)}")
