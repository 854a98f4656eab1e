#!/usr/bin/env python3
"""The in-process checks of scripts/check-deploy (run it, not this).

Each subcommand prints what it checked and every problem it found, and exits
1 on any problem. It needs PyYAML, jsonschema, pydantic and the cloudcoil
models: scripts/check-deploy runs it in its own virtualenv.

    check_deploy.py core-docs RENDERED OUT        built-in kinds only, for kubernetes-validate
    check_deploy.py crds RENDERED...              custom resources against their schemas
    check_deploy.py manifests NAME RENDERED       policy and consistency of one overlay
    check_deploy.py alerts                        metric names of alerts.yml
    check_deploy.py dashboard OUT_RULES           dashboard structure; its queries as a rule file
    check_deploy.py dockerfile [BINARY]           Dockerfile structure; the binary's shared libraries
    check_deploy.py compose OUT_DIR               compose file, topic-init, Prometheus config
    check_deploy.py config-check BINARY RENDERED...  `auditstream config check` on every role's config
    check_deploy.py e2e BINARY                    Prometheus scrapes `auditstream dev`; every dashboard query
"""

from __future__ import annotations

import base64
import copy
import inspect
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ROLES = ("producer", "router", "deliverer")
CRD_GROUPS = {"kafka.strimzi.io", "monitoring.coreos.com", "keda.sh"}
# Built-in API groups kubernetes-validate knows.
CORE_GROUPS = {
    "", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io",
    "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io", "discovery.k8s.io",
}
# Secrets the manifests reference but do not create, and who creates them.
EXTERNAL_SECRETS = {
    "auditstream-api-tokens": "the operator (docs/OPERATIONS.md#deploying)",
    "auditstream-app": "Strimzi's User Operator, from the KafkaUser",
    "auditstream-cluster-ca-cert": "Strimzi's Cluster Operator",
}
# Metrics of other software the dashboard and alerts may use (consumer lag
# is the roles' own auditstream_consumer_lag: no Kafka exporter needed).
FOREIGN_METRICS = {"up"}

problems: list[str] = []


def fail(msg: str) -> None:
    problems.append(msg)
    print(f"  FAIL {msg}")


def ok(msg: str) -> None:
    print(f"  ok   {msg}")


def finish() -> int:
    if problems:
        print(f"  {len(problems)} problem(s)")
        return 1
    return 0


def load_docs(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def group_of(doc: dict) -> str:
    api = doc.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# --- facts read from the code --------------------------------------------------

def workspace_members() -> list[str]:
    with open(ROOT / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["workspace"]["members"]


def code_topics() -> dict[str, bool]:
    """Topic base names (no retry rungs) → compacted, from proto/src/topics.rs."""
    src = (ROOT / "proto/src/topics.rs").read_text(encoding="utf-8")
    methods = dict(re.findall(r'pub fn (\w+)\(&self\) -> String \{\s*self\.name\("([^"]+)"\)', src))
    listed = re.findall(r"\(self\.(\w+)\(\), (true|false)\)", src)
    unknown = [m for m, _ in listed if m not in methods]
    if not methods or not listed or unknown or "audit.deliveries.retry.{n}" not in src:
        raise ValueError(f"cannot read the topics from proto/src/topics.rs (unreadable: {unknown}): update deploy/tools/check_deploy.py")
    return {methods[m]: c == "true" for m, c in listed}


def code_metrics() -> set[str]:
    names = set()
    for member in workspace_members():
        for rs in (ROOT / member).rglob("*.rs"):
            names.update(re.findall(r'"(auditstream_[a-z0-9_]+)"', rs.read_text(encoding="utf-8")))
    if not names:
        raise ValueError("no auditstream_* metric found in the Rust code: update deploy/tools/check_deploy.py")
    return names


def planned_metrics() -> list[str]:
    sys.dont_write_bytecode = True  # no __pycache__ in the checkout
    sys.path.insert(0, str(DEPLOY / "grafana"))
    import generate  # noqa: E402

    return list(generate.PLANNED_METRICS)


def parse_duration(text: str) -> float:
    """Seconds of `10s`, `1m`, `250ms`, `1h30m` (the config's humantime subset)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)\s*(ms|min|s|m|h|d)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"unreadable duration {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def default_config(role: str) -> dict:
    with open(DEPLOY / "config" / f"{role}.toml", "rb") as f:
        return tomllib.load(f)


def merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def quantity(q) -> float:
    s = str(q)
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G)?", s)
    if not m:
        raise ValueError(f"unreadable quantity {s!r}")
    factor = {None: 1, "m": 0.001, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    return float(m.group(1)) * factor[m.group(2)]


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", {}) if "matchLabels" in selector or "matchExpressions" in selector else selector
    if selector.get("matchExpressions"):
        raise ValueError("matchExpressions are not supported by this check")
    return all(labels.get(k) == v for k, v in match.items())


# --- core-docs ----------------------------------------------------------------------

def cmd_core_docs(rendered: str, out: str) -> int:
    core = []
    for d in load_docs(rendered):
        g = group_of(d)
        if g in CRD_GROUPS:
            continue
        if g not in CORE_GROUPS:
            fail(f"{name_of(d)}: API group {g!r} is neither built in nor a known CRD group; add a schema")
            continue
        core.append(d)
    Path(out).write_text(yaml.safe_dump_all(core, sort_keys=False), encoding="utf-8")
    ok(f"{len(core)} built-in objects written for kubernetes-validate")
    return finish()


# --- crds ----------------------------------------------------------------------------

def strict_models():
    """The cloudcoil CRD models, with unknown fields forbidden everywhere."""
    import pydantic
    import cloudcoil.models.keda.v1alpha1 as keda
    import cloudcoil.models.prometheus_operator.v1 as promop
    from cloudcoil import apimachinery

    classes = [
        c
        for m in (promop, keda, apimachinery)
        for c in vars(m).values()
        if inspect.isclass(c) and issubclass(c, pydantic.BaseModel) and c.__module__ == m.__name__
    ]
    for c in classes:
        c.model_config["extra"] = "forbid"
    for _ in range(3):  # nested models first, whatever the order
        for c in classes:
            c.model_rebuild(force=True)
    return {
        ("monitoring.coreos.com/v1", "ServiceMonitor"): promop.ServiceMonitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): promop.PrometheusRule,
        ("monitoring.coreos.com/v1", "PodMonitor"): promop.PodMonitor,
        ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
        ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
    }


def cmd_crds(paths: list[str]) -> int:
    import jsonschema
    import pydantic

    models = strict_models()
    schemas = {
        ("kafka.strimzi.io/v1beta2", "KafkaTopic"): json.loads((DEPLOY / "schemas/strimzi-kafkatopic.schema.json").read_text()),
        ("kafka.strimzi.io/v1beta2", "KafkaUser"): json.loads((DEPLOY / "schemas/strimzi-kafkauser.schema.json").read_text()),
    }
    counts: dict[str, int] = {}
    for path in paths:
        for d in load_docs(path):
            if group_of(d) not in CRD_GROUPS:
                continue
            key = (d.get("apiVersion"), d.get("kind"))
            where = f"{Path(path).name}: {name_of(d)}"
            if key in models:
                try:
                    models[key].model_validate(d)
                except pydantic.ValidationError as e:
                    fail(f"{where}: {e}")
                    continue
            elif key in schemas:
                errors = sorted(jsonschema.Draft7Validator(schemas[key]).iter_errors(d), key=lambda e: list(e.path))
                if errors:
                    for e in errors:
                        fail(f"{where}: {'/'.join(map(str, e.path))}: {e.message}")
                    continue
            else:
                fail(f"{where}: no schema for {key[0]} {key[1]}")
                continue
            counts[key[1]] = counts.get(key[1], 0) + 1
    ok("valid: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return finish()


# --- manifests -----------------------------------------------------------------------

def cmd_manifests(overlay: str, rendered: str) -> int:
    docs = load_docs(rendered)
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    get = lambda kind: by_kind.get(kind, [])  # noqa: E731
    configmaps = {c["metadata"]["name"]: c for c in get("ConfigMap")}
    secrets = {s["metadata"]["name"]: s for s in get("Secret")}

    # Deployments, one per role.
    deployments = {}
    for dep in get("Deployment"):
        role = dep["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        deployments[role] = dep
    if sorted(deployments) != sorted(ROLES):
        fail(f"Deployments for roles {sorted(deployments)}, expected {sorted(ROLES)}")
    role_configs: dict[str, dict] = {}
    for role, dep in deployments.items():
        where = f"Deployment/{dep['metadata']['name']}"
        pod = dep["spec"]["template"]["spec"]
        if dep["metadata"]["name"] != f"auditstream-{role}":
            fail(f"{where}: name should be auditstream-{role}")
        c = pod["containers"][0]
        if len(pod["containers"]) != 1:
            fail(f"{where}: one container expected")
        # The role and its config file.
        args = c.get("args", [])
        if args[:1] != [role] or "--config" not in args:
            fail(f"{where}: args {args} should start with {role!r} and pass --config")
            continue
        cfg_path = args[args.index("--config") + 1]
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mount_dir, key = cfg_path.rsplit("/", 1)
        mount = mounts.get(mount_dir)
        cm_name = mount and volumes.get(mount["name"], {}).get("configMap", {}).get("name")
        if not cm_name or cm_name not in configmaps or key not in configmaps[cm_name].get("data", {}):
            fail(f"{where}: --config {cfg_path} is not a key of a mounted ConfigMap of this overlay")
            continue
        cfg = merged(default_config(role), tomllib.loads(configmaps[cm_name]["data"][key]))
        role_configs[role] = cfg
        # Image.
        image = c.get("image", "")
        if image.endswith(":latest") or (":" not in image.rsplit("/", 1)[-1] and "@" not in image):
            fail(f"{where}: image {image!r} needs a fixed tag or digest")
        # Security.
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")) or psc.get("runAsUser", 1) == 0:
            fail(f"{where}: must run as non-root")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            fail(f"{where}: seccompProfile RuntimeDefault expected")
        if csc.get("readOnlyRootFilesystem") is not True:
            fail(f"{where}: readOnlyRootFilesystem must be true")
        if csc.get("allowPrivilegeEscalation") is not False:
            fail(f"{where}: allowPrivilegeEscalation must be false")
        if "ALL" not in csc.get("capabilities", {}).get("drop", []):
            fail(f"{where}: capabilities must drop ALL")
        # Ports and probes against the role's own listen addresses.
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        admin_port = int(cfg["admin"]["listen"].rsplit(":", 1)[1])
        if ports.get("admin") != admin_port:
            fail(f"{where}: container port 'admin' {ports.get('admin')} != admin.listen {cfg['admin']['listen']}")
        if role == "producer":
            api_port = int(cfg["api"]["listen"].rsplit(":", 1)[1])
            if ports.get("api") != api_port:
                fail(f"{where}: container port 'api' {ports.get('api')} != api.listen {cfg['api']['listen']}")
        for probe, path in (("livenessProbe", "/live"), ("readinessProbe", "/ready")):
            http = c.get(probe, {}).get("httpGet", {})
            if http.get("path") != path or http.get("port") not in ("admin", admin_port):
                fail(f"{where}: {probe} should GET {path} on the admin port")
        # Resources.
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    fail(f"{where}: resources.{kind}.{r} missing")
        for r in ("cpu", "memory"):
            if r in res.get("requests", {}) and r in res.get("limits", {}):
                if quantity(res["requests"][r]) > quantity(res["limits"][r]):
                    fail(f"{where}: {r} request above its limit")
        # Shutdown fits the grace period.
        grace = parse_duration(cfg["shutdown"]["grace"])
        pre = c.get("lifecycle", {}).get("preStop", {})
        pre_s = 0
        if "exec" in pre and pre["exec"]["command"][:1] == ["sleep"]:
            pre_s = float(pre["exec"]["command"][1])
        elif "sleep" in pre:
            pre_s = float(pre["sleep"]["seconds"])
        tgp = pod.get("terminationGracePeriodSeconds", 30)
        if pre_s + grace + 2 > tgp:
            fail(f"{where}: preStop {pre_s}s + shutdown.grace {grace}s + 2s margin exceed terminationGracePeriodSeconds {tgp}")
        # Kafka settings stay in Strimzi's hands.
        if cfg["kafka"].get("create_topics") is not False:
            fail(f"{where}: kafka.create_topics should be false (topics are KafkaTopic resources)")
        # Secret references.
        refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
        refs += [v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v]
        for ref in refs:
            if ref not in secrets and ref not in EXTERNAL_SECRETS:
                fail(f"{where}: Secret {ref!r} is neither created by this overlay nor a documented external Secret")
        # SASL: the password comes from the environment, never the ConfigMap.
        props = cfg["kafka"].get("properties", {})
        if "sasl.password" in props:
            fail(f"{where}: sasl.password must come from a Secret, not the ConfigMap")
        if props.get("security.protocol", "").startswith("SASL"):
            envs = {e["name"] for e in c.get("env", [])}
            if "AUDITSTREAM_KAFKA__PROPERTIES__SASL.PASSWORD" not in envs:
                fail(f"{where}: SASL is configured but AUDITSTREAM_KAFKA__PROPERTIES__SASL.PASSWORD is not set")
            users = [u["metadata"]["name"] for u in get("KafkaUser")]
            if users and props.get("sasl.username") not in users:
                fail(f"{where}: sasl.username {props.get('sasl.username')!r} is not a KafkaUser of this overlay {users}")
        if role == "producer" and overlay != "dev" and not cfg["auth"].get("required", True):
            fail(f"{where}: auth.required must be true outside dev")
        # A PodDisruptionBudget covers it.
        labels = dep["spec"]["template"]["metadata"]["labels"]
        if not any(selects(p["spec"]["selector"], labels) for p in get("PodDisruptionBudget")):
            fail(f"{where}: no PodDisruptionBudget selects it")
    ok(f"{len(deployments)} Deployments: args, config, image, security, ports, probes, resources, shutdown, secrets, PDB")

    pods = {role: (d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"]["containers"][0]) for role, d in deployments.items()}

    def port_names(container):
        return {p["name"] for p in container.get("ports", [])} | {p["containerPort"] for p in container.get("ports", [])}

    # Services and the ServiceMonitor.
    services = get("Service")
    for s in services:
        matched = [r for r, (labels, _) in pods.items() if selects(s["spec"]["selector"], labels)]
        if not matched:
            fail(f"{name_of(s)}: selects no pod")
        for p in s["spec"]["ports"]:
            for r in matched:
                if p.get("targetPort", p["port"]) not in port_names(pods[r][1]):
                    fail(f"{name_of(s)}: targetPort {p.get('targetPort')} is not a port of the {r} container")
    if not any(selects(s["spec"]["selector"], pods["producer"][0]) and any(p["name"] == "api" for p in s["spec"]["ports"]) for s in services if "producer" in pods):
        fail("no Service exposes the producer API")
    for sm in get("ServiceMonitor"):
        scraped = [s for s in services if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        roles = {r for s in scraped for r, (labels, _) in pods.items() if selects(s["spec"]["selector"], labels)}
        if roles != set(ROLES):
            fail(f"{name_of(sm)}: scrapes roles {sorted(roles)}, expected all of {list(ROLES)}")
        for ep in sm["spec"]["endpoints"]:
            for s in scraped:
                if ep["port"] not in {p["name"] for p in s["spec"]["ports"]}:
                    fail(f"{name_of(sm)}: port {ep['port']!r} is not a port of {name_of(s)}")
    if not get("ServiceMonitor"):
        fail("no ServiceMonitor")
    ok(f"{len(services)} Services and {len(get('ServiceMonitor'))} ServiceMonitor select real pods and ports")

    # NetworkPolicies.
    topics = get("KafkaTopic")
    clusters = {t["metadata"]["labels"].get("strimzi.io/cluster") for t in topics}
    for np in get("NetworkPolicy"):
        matched = [r for r, (labels, _) in pods.items() if selects(np["spec"]["podSelector"], labels)]
        if not matched:
            fail(f"{name_of(np)}: selects no pod")
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                if isinstance(p.get("port"), str) and not all(p["port"] in port_names(pods[r][1]) for r in matched):
                    fail(f"{name_of(np)}: ingress port {p['port']!r} is not a port of every selected pod")
        for rule in np["spec"].get("egress", []):
            for peer in rule.get("to", []):
                cl = peer.get("podSelector", {}).get("matchLabels", {}).get("strimzi.io/cluster")
                if cl is not None and {cl} != clusters:
                    fail(f"{name_of(np)}: Kafka egress to cluster {cl!r}, topics belong to {sorted(clusters)}")
                cidr = peer.get("ipBlock", {}).get("cidr")
                if cidr:
                    net = ipaddress.ip_network(cidr)
                    for ex in peer["ipBlock"].get("except", []):
                        if not ipaddress.ip_network(ex).subnet_of(net):
                            fail(f"{name_of(np)}: except {ex} is outside {cidr}")
    admin_open = any(
        any(p.get("port") in ("admin", 9090) for rule in np["spec"].get("ingress", []) for p in rule.get("ports", []))
        for np in get("NetworkPolicy")
    )
    if get("NetworkPolicy") and not admin_open:
        fail("NetworkPolicies never admit scrapes of the admin port")
    ok(f"{len(get('NetworkPolicy'))} NetworkPolicies select pods, name real ports and the topics' Kafka cluster")

    # Brokers: the bootstrap address belongs to the topics' cluster.
    for role, cfg in role_configs.items():
        host = cfg["kafka"]["brokers"].split(",")[0].rsplit(":", 1)[0]
        if clusters and not any(host.startswith(f"{c}-kafka-bootstrap") for c in clusters):
            fail(f"{role}: kafka.brokers {cfg['kafka']['brokers']!r} is not the bootstrap of cluster {sorted(clusters)}")

    # Autoscaling: one autoscaler per consumer role, within the partitions.
    scalers: dict[str, list[tuple[str, int]]] = {}
    for h in get("HorizontalPodAutoscaler"):
        scalers.setdefault(h["spec"]["scaleTargetRef"]["name"], []).append((name_of(h), h["spec"]["maxReplicas"]))
    for so in get("ScaledObject"):
        scalers.setdefault(so["spec"]["scaleTargetRef"]["name"], []).append((name_of(so), so["spec"].get("maxReplicaCount", 100)))
    partitions = {t["spec"]["topicName"]: t["spec"]["partitions"] for t in topics}
    consumed = {"router": "audit.events", "deliverer": "audit.deliveries"}
    for target, found in scalers.items():
        if target not in {d["metadata"]["name"] for d in deployments.values()}:
            fail(f"{found[0][0]}: targets {target!r}, which is not a Deployment here")
    for role, topic in consumed.items():
        found = scalers.get(f"auditstream-{role}", [])
        if len(found) != 1:
            fail(f"{role}: {len(found)} autoscalers ({found}), expected exactly one (HPA or ScaledObject)")
            continue
        if topic in partitions and found[0][1] > partitions[topic]:
            fail(f"{found[0][0]}: maxReplicas {found[0][1]} above the {partitions[topic]} partitions of {topic}: extra consumers sit idle")
    # Lag triggers read the roles' own gauge, for the role's group and
    # consumed topic, never the retry group, the retry topics (their lag is
    # the retry schedule, not load) or a dead-letter topic.
    lag_triggers = 0
    for so in get("ScaledObject"):
        role = next((r for r in consumed if so["spec"]["scaleTargetRef"]["name"] == f"auditstream-{r}"), None)
        cfg = role_configs.get(role) if role else None
        for trig in so["spec"]["triggers"]:
            if trig.get("type") != "prometheus" or not cfg:
                continue
            q = trig.get("metadata", {}).get("query", "")
            where = f"{name_of(so)}: query {q!r}"
            if "kafka_consumergroup_lag" in q or "auditstream_consumer_lag" not in q:
                fail(f"{where}: should read auditstream_consumer_lag (the roles export their own lag)")
                continue
            lag_triggers += 1
            prefix = cfg["kafka"].get("topic_prefix", "")
            group = cfg[role]["group_id"]
            wanted = {"group": [group], "topic": [prefix + consumed[role]]}
            unwanted = {"group": [retry_group_id(cfg) if role == "deliverer" else group + "-retry-0"],
                        "topic": [prefix + "audit.deliveries.retry.0", prefix + consumed[role] + ".dlq"]}
            for label in ("group", "topic"):
                m = re.search(r"\b" + label + r'\s*(=~|=)\s*"([^"]*)"', q)
                if not m:
                    fail(f"{where}: no {label} matcher")
                    continue
                hit = (lambda v, m=m: re.fullmatch(m.group(2), v) is not None) if m.group(1) == "=~" else (lambda v, m=m: v == m.group(2))
                for v in wanted[label]:
                    if not hit(v):
                        fail(f"{where}: {label} matcher does not select {v!r}")
                for v in unwanted[label]:
                    if hit(v):
                        fail(f"{where}: {label} matcher also selects {v!r}, whose lag is not load (the retry schedule, or unread dead letters)")
    ok(f"autoscaling: one autoscaler each for router and deliverer, at most one replica per partition; "
       f"{lag_triggers} lag triggers on auditstream_consumer_lag of the role's own group and topic")

    # Topics.
    check_topics(topics, role_configs.get("deliverer") or default_config("deliverer"))

    # The PrometheusRule carries alerts.yml.
    rules = get("PrometheusRule")
    alerts = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text(encoding="utf-8"))
    if len(rules) != 1 or rules[0]["spec"] != alerts:
        fail("the PrometheusRule's spec differs from deploy/prometheus/alerts.yml")
    else:
        ok("PrometheusRule spec equals deploy/prometheus/alerts.yml")
    return finish()


def check_topics(topics: list[dict], deliverer_cfg: dict) -> None:
    base = code_topics()
    delays = [parse_duration(d) for d in deliverer_cfg["deliverer"]["retry_delays"]]
    expected = dict(base)
    for n in range(len(delays)):
        expected[f"audit.deliveries.retry.{n}"] = False
    found = {t["spec"].get("topicName", t["metadata"]["name"]): t for t in topics}
    if set(found) != set(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        fail(f"KafkaTopics differ from proto/src/topics.rs + {len(delays)} retry rungs: missing {missing}, unexpected {extra}")
    day = 86400
    for name, t in found.items():
        where = f"KafkaTopic {name}"
        spec, conf = t["spec"], t["spec"].get("config", {})
        compacted = expected.get(name)
        policy = conf.get("cleanup.policy")
        if compacted and policy != "compact":
            fail(f"{where}: a table topic needs cleanup.policy compact (has {policy!r})")
        if compacted and conf.get("min.compaction.lag.ms", 0) < day * 1000:
            fail(f"{where}: a table topic needs min.compaction.lag.ms of at least a day, so the relay reads each destination record's audit event before compaction")
        if compacted is False and policy not in ("delete", None):
            fail(f"{where}: cleanup.policy {policy!r}; only table topics are compacted")
        if compacted is False and "retention.ms" not in conf:
            fail(f"{where}: set retention.ms explicitly")
        replicas, min_isr = spec.get("replicas", 1), conf.get("min.insync.replicas", 1)
        if min_isr > replicas:
            fail(f"{where}: min.insync.replicas {min_isr} above replicas {replicas}: nothing could be written")
        if replicas >= 3 and min_isr < 2:
            fail(f"{where}: with {replicas} replicas, min.insync.replicas should be at least 2 (acks=all)")
        retention_s = conf.get("retention.ms", -1) / 1000 if conf.get("retention.ms", -1) != -1 else float("inf")
        m = re.fullmatch(r"audit\.deliveries\.retry\.(\d+)", name)
        if m and int(m.group(1)) < len(delays):
            delay = delays[int(m.group(1))]
            need = max(4 * delay, 2 * day)
            if retention_s < need:
                fail(f"{where}: retention {retention_s / 3600:g} h is not comfortably above its delay {delay / 3600:g} h (need {need / 3600:g} h)")
        if name.endswith(".dlq") and retention_s < 14 * day:
            fail(f"{where}: a dead-letter topic should keep at least 14 days (has {retention_s / day:g})")
        if name in ("audit.events", "audit.deliveries") and retention_s < 3 * day:
            fail(f"{where}: keep at least 3 days, to replay after an outage")
    ok(f"{len(found)} KafkaTopics: names from the code, {len(delays)} retry rungs, compaction and its lag, retention against delays, ISR")


# --- metric names of alerts and dashboard ------------------------------------------

def code_strings() -> set[str]:
    """Every string literal of the Rust code (label values are among them),
    plus the label values the code builds at run time (retry_group_id)."""
    found = set()
    for member in workspace_members():
        for rs in (ROOT / member).rglob("*.rs"):
            found.update(re.findall(r'"([A-Za-z0-9_.:-]+)"', rs.read_text(encoding="utf-8")))
    deliverer = default_config("deliverer")
    for rung in range(len(deliverer["deliverer"]["retry_delays"])):
        found.add(retry_group_id(deliverer, rung))
    return found


def retry_group_id(deliverer_cfg: dict, rung: int = 0) -> str:
    """Retry rung `rung`'s consumer group: `<deliverer.group_id>-retry-<n>`
    (deliverer/src/lib.rs builds it; the `group` label of its lag)."""
    src = (ROOT / "deliverer/src/lib.rs").read_text(encoding="utf-8")
    if 'format!("{group_id}-retry-{n}")' not in src:
        raise ValueError("cannot find how deliverer/src/lib.rs names the retry groups: update deploy/tools/check_deploy.py")
    return f"{deliverer_cfg['deliverer']['group_id']}-retry-{rung}"


def check_metric_names(exprs: list[tuple[str, str]], what: str) -> None:
    known, planned = code_metrics(), set(planned_metrics())
    strings = code_strings()
    values = 0
    for where, expr in exprs:
        # Label values matched exactly on our metrics must be values the code writes.
        for sel in re.findall(r"auditstream_[a-z0-9_]+\{([^}]*)\}", expr):
            for label, value in re.findall(r'(\w+)!?="([^"]*)"', sel):
                values += 1
                if label != "namespace" and value not in strings:
                    fail(f"{what} {where}: {label}=\"{value}\" is a value the code never writes")
    for m in planned & known:
        print(f"  note {m} (planned) is exported by the code now")
    used = set()
    for where, expr in exprs:
        for name in re.findall(r"\b(auditstream_[a-z0-9_]+|kafka_[a-z0-9_]+)\b", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            used.add(base)
            if name in FOREIGN_METRICS or base in known or base in planned:
                continue
            fail(f"{what} {where}: metric {name} is neither exported by the code nor planned")
    ok(f"{what}: {len(exprs)} expressions use {len(used)} metrics, all exported by the code, planned or foreign ({', '.join(sorted(FOREIGN_METRICS))}); {values} label values, all written by the code")


def cmd_alerts() -> int:
    doc = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text(encoding="utf-8"))
    exprs = [(r.get("alert") or r.get("record"), r["expr"]) for g in doc["groups"] for r in g["rules"]]
    check_metric_names(exprs, "alerts.yml")
    tested = (DEPLOY / "prometheus/alerts.test.yml").read_text(encoding="utf-8")
    for name, _ in exprs:
        if f"alertname: {name}" not in tested:
            fail(f"alert {name} has no promtool unit test in alerts.test.yml")
    ok(f"every one of the {len(exprs)} alerts has a unit test")
    # Runbook links point at real sections of docs/OPERATIONS.md.
    ops = (ROOT / "docs/OPERATIONS.md").read_text(encoding="utf-8")
    slugs = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", ops, re.M)}
    links = [r["annotations"].get("runbook", "") for g in doc["groups"] for r in g["rules"]]
    for link in links:
        path, _, anchor = link.partition("#")
        if path != "docs/OPERATIONS.md" or anchor not in slugs:
            fail(f"runbook {link!r} is not a section of docs/OPERATIONS.md")
    ok(f"every alert's runbook is a section of docs/OPERATIONS.md ({len(set(links))} sections)")
    return finish()


# --- dashboard -------------------------------------------------------------------------

def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for at query time."""
    return (
        expr.replace("$__rate_interval", "1m").replace("${__rate_interval}", "1m")
        .replace("$__interval", "1m").replace("$__range", "1h")
        .replace('"$namespace"', '".*"').replace('"${namespace}"', '".*"')
    )


def dashboard_targets() -> list[tuple[str, str, str]]:
    dash = json.loads((DEPLOY / "grafana/auditstream.json").read_text(encoding="utf-8"))
    return [(f"panel {p['id']} {p['title']!r} {t['refId']}", p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def cmd_dashboard(out_rules: str) -> int:
    dash = json.loads((DEPLOY / "grafana/auditstream.json").read_text(encoding="utf-8"))
    if dash.get("uid") != "auditstream" or not dash.get("title"):
        fail("dashboard needs uid 'auditstream' and a title")
    ids, boxes = set(), []
    for p in dash["panels"]:
        if p["id"] in ids:
            fail(f"panel id {p['id']} used twice")
        ids.add(p["id"])
        g = p["gridPos"]
        if g["x"] < 0 or g["x"] + g["w"] > 24:
            fail(f"panel {p['id']} {p['title']!r} sticks out of the 24-column grid")
        for q in boxes:
            if g["x"] < q["x"] + q["w"] and q["x"] < g["x"] + g["w"] and g["y"] < q["y"] + q["h"] and q["y"] < g["y"] + g["h"]:
                fail(f"panel {p['id']} {p['title']!r} overlaps another panel")
        boxes.append(g)
        if p["type"] == "row":
            continue
        if not p.get("targets"):
            fail(f"panel {p['id']} {p['title']!r} has no query")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${datasource}":
                fail(f"panel {p['id']} {t['refId']}: datasource should be the $datasource variable")
    variables = {v["name"] for v in dash["templating"]["list"]}
    targets = dashboard_targets()
    for _, _, expr in targets:
        for v in re.findall(r"\$\{?([a-zA-Z_]+)", expr):
            if not v.startswith("__") and v not in variables:
                fail(f"query uses ${v}, which is not a dashboard variable: {expr}")
    ok(f"{len(dash['panels'])} panels: unique ids, on the grid, no overlaps, $datasource everywhere, known variables")
    # What the issue asks the dashboard to show, per role.
    text = " ".join((p.get("title", "") + " " + p.get("description", "")).lower() for p in dash["panels"])
    for topic, words in {
        "throughput": ["by outcome", "per second"], "latency": ["latency"], "errors": ["error"], "lag": ["lag"],
        "retries": ["retry"], "dead letters": ["dead letter", "dead-letter"],
    }.items():
        if not any(w in text for w in words):
            fail(f"no panel about {topic}")
    exprs = " ".join(e for _, _, e in targets)
    for role in ROLES:
        if f"auditstream_{role}_" not in exprs:
            fail(f"no panel shows the {role}'s metrics")
    rows = [p["title"].lower() for p in dash["panels"] if p["type"] == "row"]
    for role in ROLES:
        if role not in rows:
            fail(f"no row for the {role}")
    ok("covers throughput, latency, errors, lag, retries and dead letters; a row per role")
    check_metric_names([(w, e) for w, _, e in targets], "dashboard")
    # For `promtool check rules`: one recording rule per query parses it.
    rules = {"groups": [{"name": "dashboard-queries", "rules": [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)} for i, (_, _, e) in enumerate(targets)
    ]}]}
    Path(out_rules).write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    ok(f"{len(targets)} queries written to {out_rules} for promtool")
    return finish()


# --- Dockerfile --------------------------------------------------------------------------

def cmd_dockerfile(binary: str | None) -> int:
    text = (DEPLOY / "docker/Dockerfile").read_text(encoding="utf-8")
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.lstrip().startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(lines), re.M))
    subst = lambda s: re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)  # noqa: E731
    froms = [subst(l.split()[1]) for l in lines if l.startswith("FROM ")]
    if not froms or froms[0] != "rust:1.95-bookworm":
        fail(f"the build stage should be FROM rust:1.95-bookworm (is {froms[:1]})")
    if not froms or froms[-1] != "debian:bookworm-slim":
        fail(f"the runtime stage should be FROM debian:bookworm-slim (is {froms[-1:]})")
    final = lines[max(i for i, l in enumerate(lines) if l.startswith("FROM ")):]
    user = [l.split()[1] for l in final if l.startswith("USER ")]
    if not user or not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user[-1]):
        fail(f"the runtime stage needs a numeric non-root USER (has {user})")
    if 'ENTRYPOINT ["auditstream"]' not in final:
        fail('ENTRYPOINT ["auditstream"] missing in the runtime stage')
    if 'CMD ["producer"]' not in final:
        fail('CMD ["producer"] missing in the runtime stage')
    exposed = {p for l in final if l.startswith("EXPOSE ") for p in l.split()[1:]}
    if not {"8080", "9090"} <= exposed:
        fail(f"EXPOSE 8080 9090 expected (has {sorted(exposed)})")
    copies = [l for l in final if l.startswith("COPY ")]
    if len(copies) != 1 or "--from=" not in copies[0] or "auditstream" not in copies[0]:
        fail(f"the runtime stage should copy only the binary from the build stage (has {copies})")
    installs = " ".join(l for l in final if "apt-get install" in l)
    for pkg in ("libssl3", "zlib1g", "ca-certificates"):
        if pkg not in installs:
            fail(f"the runtime stage does not install {pkg}")
    build = " ".join(lines)
    if not re.search(r"cargo build --release --locked -p auditstream", build):
        fail("the build stage should run cargo build --release --locked -p auditstream")
    copied = {l.split()[1] for l in lines if l.startswith("COPY ") and "--from" not in l}
    copied |= {w for l in lines if l.startswith("COPY ") and "--from" not in l for w in l.split()[1:-1]}
    for need in ["Cargo.toml", "Cargo.lock", *workspace_members()]:
        if need not in copied:
            fail(f"the build stage does not COPY {need} (a workspace member or manifest)")
    ok(f"stages {froms}, USER {user[-1] if user else None}, ENTRYPOINT/CMD, EXPOSE, only the binary, all {len(workspace_members())} workspace members copied")
    if binary:
        # Every shared library the binary needs comes from a package the
        # runtime image has (debian:bookworm-slim + what the Dockerfile adds).
        allowed = ("libc6", "libgcc-s1", "libssl3", "zlib1g")
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
        libs = re.findall(r"=>\s+(/\S+)", out)
        for lib in libs:
            owner = subprocess.run(["dpkg", "-S", lib], capture_output=True, text=True)
            if owner.returncode != 0:
                real = os.path.realpath(lib)
                owner = subprocess.run(["dpkg", "-S", real], capture_output=True, text=True)
            pkg = owner.stdout.split(":")[0] if owner.returncode == 0 else "?"
            if not pkg.startswith(allowed):
                fail(f"the binary links {lib} from package {pkg!r}, which the runtime image does not install")
        ok(f"the binary's {len(libs)} shared libraries all come from {', '.join(allowed)}")
    return finish()


# --- compose -------------------------------------------------------------------------------

def cmd_compose(out_dir: str) -> int:
    cdir = DEPLOY / "compose"
    doc = yaml.safe_load((cdir / "compose.yaml").read_text(encoding="utf-8"))
    services = doc["services"]
    need = {"kafka", "topic-init", *ROLES, "receiver"}
    if not need <= set(services):
        fail(f"compose services {sorted(services)} lack {sorted(need - set(services))}")
        return finish()
    kafka = services["kafka"]
    env = kafka.get("environment", {})
    if not str(kafka.get("image", "")).startswith("apache/kafka:"):
        fail("the broker should be the apache/kafka image")
    if set(str(env.get("KAFKA_PROCESS_ROLES", "")).split(",")) != {"broker", "controller"} or any("zookeeper" in k.lower() for k in env):
        fail("Kafka should run in KRaft mode (process roles broker,controller, no ZooKeeper)")
    advertised = dict(re.findall(r"(\w+)://([^,]+)", str(env.get("KAFKA_ADVERTISED_LISTENERS", ""))))
    inter = env.get("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT")
    ok(f"Kafka {kafka['image']} in KRaft mode, advertises {advertised}")
    role_env: dict[str, dict] = {}
    for role in ROLES:
        s = services[role]
        cmd = s.get("command", [])
        if cmd[:1] != [role]:
            fail(f"service {role}: command should start with {role!r} (has {cmd})")
        dep = s.get("depends_on", {})
        if dep.get("topic-init", {}).get("condition") != "service_completed_successfully":
            fail(f"service {role}: should wait for topic-init to complete")
        e = {k: str(v) for k, v in s.get("environment", {}).items()}
        role_env[role] = e
        if e.get("AUDITSTREAM_KAFKA__BROKERS") != advertised.get(inter):
            fail(f"service {role}: brokers {e.get('AUDITSTREAM_KAFKA__BROKERS')!r} != the advertised {inter} listener {advertised.get(inter)!r}")
        if e.get("AUDITSTREAM_KAFKA__CREATE_TOPICS") != "false":
            fail(f"service {role}: AUDITSTREAM_KAFKA__CREATE_TOPICS should be false (topic-init creates them)")
        if not s.get("read_only"):
            fail(f"service {role}: run with read_only: true, as on Kubernetes")
    tokens = tomllib.loads("v = " + role_env["producer"]["AUDITSTREAM_AUTH__TOKENS"])["v"]
    if not tokens or not all(re.fullmatch(r"[0-9a-f]{64}", t["sha256"]) for t in tokens):
        fail("producer AUTH__TOKENS should hold SHA-256 hashes")
    ok("roles: command, topic-init dependency, brokers, read-only, token hashes")

    # topic-init creates the code's topics.
    script = (cdir / "topic-init.sh").read_text(encoding="utf-8")
    created: dict[str, bool] = {}
    for kind, name in re.findall(r"^\s*(stream|table) (audit\.[a-z.]+)\b", script, re.M):
        created[name] = kind == "table"
    loop = re.search(r"for n in ([\d ]+); do\s+stream \"audit\.deliveries\.retry\.\$n\"", script)
    rungs = [int(n) for n in loop.group(1).split()] if loop else []
    for n in rungs:
        created[f"audit.deliveries.retry.{n}"] = False
    delays = default_config("deliverer")["deliverer"]["retry_delays"]
    if "AUDITSTREAM_DELIVERER__RETRY_DELAYS" in role_env["deliverer"]:
        delays = tomllib.loads("v = " + role_env["deliverer"]["AUDITSTREAM_DELIVERER__RETRY_DELAYS"])["v"]
    expected = dict(code_topics())
    expected.update({f"audit.deliveries.retry.{n}": False for n in range(len(delays))})
    table_def = re.search(r"^table\(\) \{.*\}$", script, re.M)
    if not table_def or "min.compaction.lag.ms=$day" not in table_def.group(0):
        fail("topic-init.sh: table() should set min.compaction.lag.ms=$day (the relay reads every destination record)")
    if created != expected:
        fail(f"topic-init creates {sorted(created.items())}, the code needs {sorted(expected.items())} (name, compacted)")
    else:
        ok(f"topic-init.sh creates the {len(created)} topics of proto/src/topics.rs, tables compacted")
    # The seeded destination and the receiver agree.
    seed = re.search(r"'(\{\"id\".*\})'", script)
    rcmd = services["receiver"].get("command", [])
    if not seed or "--expect" not in rcmd:
        fail("topic-init should seed a destination and the receiver should --expect it")
    else:
        dest = json.loads(seed.group(1))
        missing = {"id", "owner", "name", "url", "verification_token"} - set(dest)
        if missing:
            fail(f"seeded destination lacks {sorted(missing)}")
        name, token = rcmd[rcmd.index("--expect") + 1].split("=", 1)
        if (dest.get("name"), dest.get("verification_token")) != (name, token):
            fail(f"receiver --expect {name}={token} does not match the seeded destination {dest.get('name')}={dest.get('verification_token')}")
        if not 16 <= len(token) <= 24:
            fail("verification token must be 16 to 24 characters")
        url = urllib.parse.urlsplit(dest.get("url", ""))
        listen = rcmd[rcmd.index("--listen") + 1] if "--listen" in rcmd else "127.0.0.1:8081"
        if url.hostname != "receiver" or url.port != int(listen.rsplit(":", 1)[1]):
            fail(f"seeded destination URL {dest.get('url')} does not reach the receiver service on {listen}")
        if "AUDITSTREAM_DELIVERER__ALLOWED_NETWORKS" not in role_env["deliverer"]:
            fail("the deliverer must allow the private compose network (deliverer.allowed_networks)")
        ok(f"seeded destination {dest['id']!r} reaches the receiver, which expects its token")
    # Bind mounts exist; Prometheus config laid out as in the container.
    for sname, s in services.items():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith((".", "/")) and not (cdir / src).exists():
                fail(f"service {sname}: bind-mount source {src} does not exist")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for v in services.get("prometheus", {}).get("volumes", []):
        src, dst = v.split(":")[:2]
        shutil.copy(cdir / src, out / Path(dst).name)
    prom = yaml.safe_load((cdir / "prometheus.yml").read_text(encoding="utf-8"))
    targets = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for role in ROLES:
        if f"{role}:9090" not in targets:
            fail(f"compose Prometheus does not scrape {role}:9090")
    for f in ("grafana-provisioning.yaml", "grafana-dashboards.yaml"):
        yaml.safe_load((cdir / f).read_text(encoding="utf-8"))
    ok(f"bind mounts exist; Prometheus scrapes every role; its config is in {out} for promtool")
    # For config-check: the environment of every role.
    (out / "roles-env.json").write_text(json.dumps(role_env, indent=1), encoding="utf-8")
    return finish()


# --- config-check ----------------------------------------------------------------------------

def standin(secret: str, key: str) -> str:
    if key == "tokens":
        return '[{ name = "check", sha256 = "' + "0" * 64 + '", rights = ["publish"] }]'
    return "stand-in-secret"


def run_config_check(binary: str, role: str, env: dict, config: str | None, what: str, expect: int = 0) -> None:
    cmd = [binary, "config", "check", role] + (["--config", config] if config else [])
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    r = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=60)
    if r.returncode != expect:
        fail(f"{what}: `auditstream config check {role}` exited {r.returncode}, expected {expect}: {(r.stderr or r.stdout).strip()}")


def cmd_config_check(binary: str, rendered: list[str]) -> int:
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in rendered:
            docs = load_docs(path)
            overlay = Path(path).stem
            cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
            secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
            for dep in (d for d in docs if d["kind"] == "Deployment"):
                pod = dep["spec"]["template"]["spec"]
                c = pod["containers"][0]
                role = c["args"][0]
                cfg_path = c["args"][c["args"].index("--config") + 1]
                mount = next(m for m in c["volumeMounts"] if m["mountPath"] == cfg_path.rsplit("/", 1)[0])
                cm = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == mount["name"])
                file = Path(tmp) / f"{overlay}-{role}.toml"
                file.write_text(cms[cm]["data"][cfg_path.rsplit("/", 1)[1]], encoding="utf-8")
                env = {}
                for e in c.get("env", []):
                    if "value" in e:
                        env[e["name"]] = e["value"]
                    elif "secretKeyRef" in e.get("valueFrom", {}):
                        ref = e["valueFrom"]["secretKeyRef"]
                        s = secrets.get(ref["name"])
                        if s and ref["key"] in s.get("data", {}):
                            env[e["name"]] = base64.b64decode(s["data"][ref["key"]]).decode()
                        elif s and ref["key"] in s.get("stringData", {}):
                            env[e["name"]] = s["stringData"][ref["key"]]
                        else:
                            env[e["name"]] = standin(ref["name"], ref["key"])
                run_config_check(binary, role, env, str(file), f"{overlay} {role}")
                n += 1
        env_file = os.environ.get("COMPOSE_ROLES_ENV")
        if env_file and not Path(env_file).exists():
            fail(f"{env_file} missing (the compose check failed before writing it): compose roles not checked")
        elif env_file:
            for role, env in json.loads(Path(env_file).read_text()).items():
                run_config_check(binary, role, env, None, f"compose {role}")
                n += 1
        # The check can fail: an unknown key must be refused with 64.
        run_config_check(binary, "router", {"AUDITSTREAM_KAFKA__BROKERZ": "x"}, None, "negative control", expect=64)
    ok(f"`auditstream config check` accepts all {n} role configurations (ConfigMap + environment, Secrets as in the overlay or stand-ins) and refuses a bad key with 64")
    return finish()


# --- e2e ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what: str, fn, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if fn():
                return True
        except OSError:
            pass
        time.sleep(0.5)
    fail(f"{what} not within {timeout:.0f} s")
    return False


def dev_bootstrap(log: Path) -> str | None:
    """The embedded mock cluster's bootstrap address, from the startup text
    of `auditstream dev` ("broker  embedded mock cluster (HOST:PORT)")."""
    m = re.search(r"^\s*broker\s+embedded mock cluster \(([^()\s]+)\)\s*$", log.read_text(errors="replace"), re.M)
    return m.group(1) if m else None


def produce_raw(bootstrap: str, topic: str, value: bytes) -> str | None:
    """Writes one record straight to Kafka with a stock client (not through
    the producer API, which validates); None on success, else the error."""
    from confluent_kafka import Producer  # installed into the virtualenv by scripts/check-deploy

    results: list = []
    producer = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 15000, "acks": "all"})
    producer.produce(topic, value=value, on_delivery=lambda err, _msg: results.append(err))
    if producer.flush(20) != 0 or not results:
        return "not acknowledged within 20 s"
    return str(results[0]) if results[0] is not None else None


# A record the router cannot read: it must dead-letter it to audit.events.dlq.
POISON = b"{not json"


def cmd_e2e(binary: str) -> int:
    prometheus = shutil.which("prometheus")
    if not prometheus:
        fail("prometheus (Debian package) not installed")
        return finish()
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        fail("confluent-kafka is not installed (scripts/check-deploy puts it into its virtualenv)")
        return finish()
    events_topic = "audit.events"  # `auditstream dev` runs without a topic prefix
    if events_topic not in code_topics():
        fail(f"{events_topic} is not a topic of proto/src/topics.rs: update deploy/tools/check_deploy.py")
        return finish()
    tmp = Path(tempfile.mkdtemp(prefix="auditstream-e2e-"))
    api, rcv, admin, prom = free_port(), free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    try:
        dev_log = open(tmp / "dev.log", "w")
        procs.append(subprocess.Popen(
            [binary, "dev", "--api", f"127.0.0.1:{api}", "--receiver", f"127.0.0.1:{rcv}", "--admin", f"127.0.0.1:{admin}"],
            stdout=dev_log, stderr=subprocess.STDOUT, start_new_session=True))
        shutil.copy(DEPLOY / "prometheus/alerts.yml", tmp / "alerts.yml")
        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "auditstream-dev", "static_configs": [{"targets": [f"127.0.0.1:{admin}"]}]}],
        }))
        prom_log = open(tmp / "prometheus.log", "w")
        procs.append(subprocess.Popen(
            [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom}"],
            stdout=prom_log, stderr=subprocess.STDOUT, start_new_session=True))
        def dev_ready() -> bool:
            # /ready holds until every role registered and passed its
            # checks (fixed in session 7; it used to answer 200 for a moment
            # at start): that every role's checks are listed is asserted too.
            st, body = http(f"http://127.0.0.1:{admin}/ready")
            checks = json.loads(body).get("checks", {}) if st == 200 else {}
            return st == 200 and all(any(k == r or k.startswith(r + ".") for k in checks) for r in ROLES)

        if not wait_for("auditstream dev ready (all roles' checks)", lambda: procs[0].poll() is not None or dev_ready(), 90) \
                or procs[0].poll() is not None:
            if procs[0].poll() is not None:
                fail(f"auditstream dev exited with status {procs[0].returncode} before it was ready")
            print((tmp / "dev.log").read_text()[-3000:])
            return finish()
        if not wait_for("prometheus ready", lambda: http(f"http://127.0.0.1:{prom}/-/ready")[0] == 200, 30):
            return finish()
        ok(f"auditstream dev (admin 127.0.0.1:{admin}) and Prometheus (127.0.0.1:{prom}) running")
        bootstrap = dev_bootstrap(tmp / "dev.log")
        if not bootstrap:
            fail("auditstream dev did not print its embedded mock cluster's bootstrap address (line `broker  embedded mock cluster (HOST:PORT)`)")
            print((tmp / "dev.log").read_text()[-3000:])
            return finish()
        # Failures, so the failure panels have something to show: two
        # instance destinations nobody listens for (attempts fail, deliveries
        # go down the ladder). Later one is deactivated (its retries are
        # dead-lettered when due) and one deleted (its retries are dropped).
        admin_auth = {"Content-Type": "application/json", "Authorization": "Bearer dev-admin-token"}
        dead = free_port()
        failing = []
        for name in ("unreachable-a", "unreachable-b"):
            st, body = http(f"http://127.0.0.1:{api}/api/v1/instance/destinations",
                            json.dumps({"name": name, "url": f"http://127.0.0.1:{dead}/in"}).encode(), admin_auth)
            if st != 201:
                fail(f"creating the failing destination {name} answered {st}: {body[:300]!r}")
                return finish()
            failing.append(json.loads(body)["id"])
        # Traffic: valid events for a project (group + instance destinations),
        # a few invalid ones, over several scrapes.
        event = {"event_type": "merge_request_create", "entity_type": "Project", "entity_id": 24,
                 "entity_path": "example-group/example-project", "author_id": 1, "author_name": "Administrator",
                 "details": {"custom_message": "check-deploy"}}
        statuses: dict[int, int] = {}
        for i in range(12):
            st, _ = http(f"http://127.0.0.1:{api}/api/v1/events", json.dumps([event] * 5).encode(),
                         {"Content-Type": "application/json"})
            statuses[st] = statuses.get(st, 0) + 1
            if i % 4 == 0:
                st, _ = http(f"http://127.0.0.1:{api}/api/v1/events", b'{"event_type": 1}', {"Content-Type": "application/json"})
                statuses[st] = statuses.get(st, 0) + 1
            time.sleep(0.5)
        if statuses.get(202, 0) != 12 or statuses.get(422, 0) != 3:
            fail(f"publishing answered {statuses}, expected 12 × 202 and 3 × 422")
        patch = urllib.request.Request(f"http://127.0.0.1:{api}/api/v1/instance/destinations/{failing[0]}",
                                       data=b'{"active": false}', headers=admin_auth, method="PATCH")
        delete = urllib.request.Request(f"http://127.0.0.1:{api}/api/v1/instance/destinations/{failing[1]}",
                                        headers=admin_auth, method="DELETE")
        for req in (patch, delete):
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.status not in (200, 204):
                    fail(f"{req.get_method()} {req.full_url} answered {r.status}")
        query = lambda q: json.loads(http(f"http://127.0.0.1:{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q}))[1])  # noqa: E731
        # Poison: records no publisher could send through the API, written
        # straight onto the events topic with a stock client, so the router
        # dead-letters them (its dead-letter panels and alert). Two, one after
        # Prometheus has seen the first, so that the counter grows between
        # two scrapes whatever the scrape timing.
        routed_dead = 'sum(auditstream_router_events_total{outcome="dead_lettered"})'
        for n in (1, 2):
            err = produce_raw(bootstrap, events_topic, POISON)
            if err:
                fail(f"writing the poison record {POISON!r} to {events_topic} on {bootstrap}: {err}")
                break
            if not wait_for(f"poison record {n} dead-lettered by the router, counted by Prometheus",
                            lambda n=n: query(f"{routed_dead} >= {n}")["data"]["result"], 45):
                break
        else:
            ok(f"2 poison records ({POISON!r}) written to {events_topic} on the mock cluster {bootstrap}; the router dead-lettered both")
        wait_for("deliveries counted by Prometheus",
                 lambda: query('sum(auditstream_deliverer_deliveries_total{outcome="delivered"}) >= 120')["data"]["result"], 45)
        # The first retry rung is due after 10 s: the deactivated
        # destination's deliveries are then dead-lettered, the deleted one's
        # dropped.
        for outcome in ("dead_lettered", "dropped"):
            wait_for(f"deliveries {outcome} counted by Prometheus",
                     lambda o=outcome: query(f'sum(auditstream_deliverer_deliveries_total{{outcome="{o}"}}) > 0')["data"]["result"], 60)
        time.sleep(3)
        # Every dashboard query, as Grafana would send it. Only planned
        # metrics this binary does not export may be empty: lag comes from
        # the roles, failures and dead letters (router and deliverer) were
        # provoked above.
        exported = http(f"http://127.0.0.1:{admin}/metrics")[1].decode()
        missing_planned = {m for m in planned_metrics() if m not in exported}
        for m in sorted(set(planned_metrics()) - missing_planned):
            print(f"  note {m} (planned) is exported by this binary: its panels must show data")
        # Panels this check exists to prove, named in its output.
        required = {
            "consumer lag": "auditstream_consumer_lag",
            "destination attempt time": "auditstream_deliverer_attempt_duration_seconds",
            "router dead letters": 'auditstream_router_events_total{namespace=~"$namespace", outcome="dead_lettered"}',
        }
        with_data, expected_empty = 0, []
        shown: dict[str, list[str]] = {k: [] for k in required}
        for where, _, expr in dashboard_targets():
            # Without the `or vector(0)` fallback, which would hide a wrong selector.
            res = query(grafana_to_promql(expr.replace(" or vector(0)", "")))
            if res.get("status") != "success":
                fail(f"{where}: {res.get('errorType')}: {res.get('error')}")
                continue
            if res["data"]["result"]:
                with_data += 1
                for what, needle in required.items():
                    if needle in expr:
                        shown[what].append(where)
                continue
            reasons = sorted(m for m in missing_planned if m in expr)
            if reasons:
                expected_empty.append(f"{where} ({', '.join(reasons)})")
            else:
                fail(f"{where}: no data from a running pipeline: {expr}")
        ok(f"{with_data} dashboard queries return data from the running pipeline")
        for what, wheres in shown.items():
            if wheres:
                ok(f"{what}: {len(wheres)} queries return data: {'; '.join(wheres)}")
            else:
                fail(f"{what}: no dashboard query returns data")
        for e in expected_empty:
            print(f"  note no data, as expected (a planned metric this binary does not export): {e}")
        # Prometheus evaluated every alert rule without error.
        rules = json.loads(http(f"http://127.0.0.1:{prom}/api/v1/rules")[1])["data"]["groups"]
        evaluated = [r for g in rules for r in g["rules"]]
        for r in evaluated:
            if r.get("health") != "ok":
                fail(f"alert {r['name']}: health {r.get('health')}: {r.get('lastError')}")
        # The injected dead letters (deliveries of the deactivated
        # destination, the router's poison records) must raise their alerts,
        # and nothing else may fire: the rest of the pipeline is healthy.
        provoked = {"AuditstreamDeliveriesDeadLettered", "AuditstreamEventsDeadLettered"}
        wait_for("the dead-letter alerts firing", lambda: provoked <= {
            r["name"] for g in json.loads(http(f"http://127.0.0.1:{prom}/api/v1/rules")[1])["data"]["groups"]
            for r in g["rules"] if r.get("state") == "firing"}, 30)
        rules = json.loads(http(f"http://127.0.0.1:{prom}/api/v1/rules")[1])["data"]["groups"]
        firing = {r["name"] for g in rules for r in g["rules"] if r.get("state") == "firing"}
        if firing != provoked:
            fail(f"alerts firing: {sorted(firing)}, expected exactly {sorted(provoked)} (the injected dead letters)")
        ok(f"Prometheus evaluated all {len(evaluated)} alert rules without error; only the provoked {sorted(provoked)} fires")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return finish()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    table = {
        "core-docs": lambda: cmd_core_docs(*args),
        "crds": lambda: cmd_crds(args),
        "manifests": lambda: cmd_manifests(*args),
        "alerts": lambda: cmd_alerts(),
        "dashboard": lambda: cmd_dashboard(*args),
        "dockerfile": lambda: cmd_dockerfile(args[0] if args else None),
        "compose": lambda: cmd_compose(*args),
        "config-check": lambda: cmd_config_check(args[0], args[1:]),
        "e2e": lambda: cmd_e2e(*args),
    }
    if cmd not in table:
        print(__doc__)
        return 2
    try:
        return table[cmd]()
    except (ValueError, KeyError, TypeError, OSError, yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        fail(f"{cmd}: cannot check: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
