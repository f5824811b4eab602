#!/usr/bin/env python3
"""Checks of deploy/ that no off-the-shelf tool makes, run by deploy/check.sh.

Each subcommand checks one file or group of files and prints what is wrong,
one line per problem, exiting 1 if anything is; silent and 0 when all is
well. Most are cross-references: the names, ports, labels, timeouts and
flags that must agree between files (and with nudge's interface in
SPEC.md §6) but that each file's own validator cannot see.

    python3 deploy/checks.py SUBCOMMAND [ARGS]   (run from the repo root)
"""

import json
import re
import sys
from pathlib import Path

import yaml

DEPLOY = Path("deploy")

# nudge's interface (SPEC.md §6): the flags' environment twins and the
# metric names. Keep in step with the server.
NUDGE_ENV = {
    "NUDGE_LISTEN", "NUDGE_INTERNAL_LISTEN", "NUDGE_PUBLIC_URL", "NUDGE_TTL",
    "NUDGE_RETRY_TIMEOUT", "NUDGE_MAX_RETRIES", "NUDGE_MAX_PARKED",
    "NUDGE_MAX_POLLS_PER_CHANNEL", "NUDGE_DRAIN_PERIOD",
    "NUDGE_HEADER_READ_TIMEOUT", "NUDGE_REDIS_URL", "NUDGE_REDIS_STREAM",
    "NUDGE_REDIS_SENTINEL", "NUDGE_REDIS_MASTER_NAME", "NUDGE_BUS_RETENTION",
    "NUDGE_BUS_MAX_ENTRIES", "NUDGE_GAP_WAKE_RATE", "NUDGE_STATE_DIR",
    "NUDGE_STATE_INTERVAL",
    "NUDGE_INTERNAL_TOKEN_FILE", "NUDGE_CORS_ORIGIN", "NUDGE_LOG_FORMAT",
    "NUDGE_TLS_CERT", "NUDGE_TLS_KEY", "NUDGE_PID_FILE", "NUDGE_UPGRADE_TIMEOUT",
    "NUDGE_FAST_PATH", "NUDGE_WORKER_THREADS", "NUDGE_MAX_CHANNELS", "NUDGE_MAX_TOPIC_BYTES",
}
# A variable of the example main API container in the sidecar, not nudge's.
API_ENV = {"NUDGE_INTERNAL_URL"}
METRICS = {
    "nudge_parked_polls", "nudge_channels", "nudge_topics",
    "nudge_open_connections", "nudge_bus_connected", "nudge_polls_total",
    "nudge_publishes_total", "nudge_wakeups_total", "nudge_bus_gaps_total",
    "nudge_bus_entries_replayed_total", "nudge_bus_stalls_total",
    "nudge_bus_lag_seconds_bucket", "nudge_bus_lag_seconds_sum", "nudge_bus_lag_seconds_count",
    "nudge_fanout_seconds_bucket", "nudge_fanout_seconds_sum",
    "nudge_fanout_seconds_count",
    "nudge_state_snapshots_total", "nudge_state_snapshot_failures_total",
    "process_resident_memory_bytes", "process_open_fds", "process_max_fds",
    "process_start_time_seconds", "process_cpu_seconds_total",
    # Prometheus' own per-target series.
    "up",
}
POLL_OUTCOMES = {"new_change", "reconnect", "max_retries", "no_change",
                 "too_many_polls", "over_capacity"}
PUBLISH_SOURCES = {"api", "bus"}
DEFAULT_DRAIN_SECONDS = 10

problems = []


def problem(msg):
    problems.append(msg)


def check(cond, msg):
    if not cond:
        problem(msg)
    return cond


def seconds(text):
    """A humantime duration as nudge and systemd write them: 10s, 2m, 1m30s."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    text = str(text).strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+)\s*(ms|sec|min|s|m|h)", text):
        if m.start() != pos:
            break
        total += int(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"not a duration: {text!r}")
    return total


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ---------------------------------------------------------------- Dockerfile
def dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    froms = [l for l in lines if l.startswith("FROM ")]
    check(len(froms) >= 2, "Dockerfile: expected a multi-stage build (two FROM lines)")
    check(any(" AS builder" in l for l in froms), "Dockerfile: no builder stage")
    check(any(l.startswith("COPY --from=builder") for l in lines), "Dockerfile: runtime stage does not copy from the builder")
    user = [l for l in lines if l.startswith("USER ")]
    check(user and user[-1].split()[1].split(":")[0] not in ("root", "0"), "Dockerfile: the last USER must be non-root")
    check("STOPSIGNAL SIGTERM" in lines, "Dockerfile: missing STOPSIGNAL SIGTERM")
    check(re.search(r"^HEALTHCHECK .*/healthz", text, re.M | re.S) is not None, "Dockerfile: HEALTHCHECK must call /healthz")
    expose = " ".join(l for l in lines if l.startswith("EXPOSE "))
    check("8080" in expose and "8081" in expose, "Dockerfile: EXPOSE 8080 and 8081")
    for var, want in (("NUDGE_LISTEN", "0.0.0.0:8080"), ("NUDGE_INTERNAL_LISTEN", "0.0.0.0:8081")):
        check(re.search(rf"\b{var}={re.escape(want)}\b", text), f"Dockerfile: ENV {var}={want}")
    check(re.search(r"\bNUDGE_INTERNAL_TOKEN_FILE=/\S+", text), "Dockerfile: a non-loopback internal listener needs NUDGE_INTERNAL_TOKEN_FILE")
    check(any(l.startswith("ENTRYPOINT") and "nudge" in l for l in lines), "Dockerfile: ENTRYPOINT must run nudge")
    ignore = DEPLOY / "Dockerfile.dockerignore"
    check(ignore.exists() and "target" in ignore.read_text().split(), "Dockerfile.dockerignore must exclude target")


# ------------------------------------------------------------------- systemd
def unit_settings(path):
    settings, section = [], None
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def systemd():
    path = DEPLOY / "systemd/nudge.service"
    s = unit_settings(path)
    get = lambda k: [v for sec, key, v in s if key == k]
    check(get("LimitNOFILE") == ["1048576"], "nudge.service: LimitNOFILE=1048576")
    # A reload is the upgrade in place: SIGUSR2 to the main process, which systemd follows
    # to the new one through MAINPID= (Type=notify; the new one's READY=1 needs NotifyAccess=all).
    check(get("ExecReload") == ["/bin/kill -USR2 $MAINPID"], "nudge.service: ExecReload=/bin/kill -USR2 $MAINPID (the upgrade in place)")
    check(get("Type") == ["notify"] and get("NotifyAccess") == ["all"], "nudge.service: Type=notify, NotifyAccess=all (systemd follows MAINPID= to the new process)")
    check(get("EnvironmentFile"), "nudge.service: needs an EnvironmentFile")
    stop = get("TimeoutStopSec")
    drain = DEFAULT_DRAIN_SECONDS
    env = (DEPLOY / "systemd/nudge.env").read_text()
    m = re.search(r"^NUDGE_DRAIN_PERIOD=(\S+)", env, re.M)
    if m:
        drain = seconds(m.group(1))
    check(stop and seconds(stop[-1]) > drain, f"nudge.service: TimeoutStopSec must exceed the drain period ({drain}s)")
    required = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "DynamicUser": "yes", "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes", "SystemCallFilter": "@system-service",
    }
    for key, want in required.items():
        check(want in get(key), f"nudge.service: {key}={want}")
    check(get("RestrictAddressFamilies"), "nudge.service: RestrictAddressFamilies")
    check(any("NUDGE_INTERNAL_TOKEN_FILE=" in v for v in get("Environment")), "nudge.service: set NUDGE_INTERNAL_TOKEN_FILE")
    for var in re.findall(r"^#?(NUDGE_[A-Z_]+)=", env, re.M):
        check(var in NUDGE_ENV, f"nudge.env: {var} is not a nudge flag")


# -------------------------------------------------------------------- sysctl
def sysctl():
    path = DEPLOY / "sysctl/90-nudge.conf"
    lines = path.read_text().splitlines()
    values = {}
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        m = re.fullmatch(r"(-?)([a-z0-9_.-]+)\s*=\s*(\S.*)", line)
        if not check(m, f"{path}:{i + 1}: not `key = value`: {line}"):
            continue
        optional, key, value = m.groups()
        check(all(re.fullmatch(r"\d+", v) for v in value.split()), f"{path}:{i + 1}: {key}: expected integers, got {value}")
        check(i > 0 and lines[i - 1].lstrip().startswith("#"), f"{path}:{i + 1}: {key} has no comment saying why")
        check(key not in values, f"{path}:{i + 1}: {key} set twice")
        values[key] = [int(v) for v in value.split() if v.isdigit()]
        # A key the kernel lacks makes `sysctl --system` fail unless it is
        # marked optional; conntrack keys exist only with the module loaded.
        proc = Path("/proc/sys") / key.replace(".", "/")
        if not optional and Path("/proc/sys/net").is_dir():
            check(proc.exists(), f"{path}:{i + 1}: {key} does not exist in this kernel (prefix it with '-' if it is optional)")
        if key.startswith("net.netfilter."):
            check(optional, f"{path}:{i + 1}: {key} exists only when nf_conntrack is loaded: prefix it with '-'")
    limit = [v for _, k, v in unit_settings(DEPLOY / "systemd/nudge.service") if k == "LimitNOFILE"]
    if limit and "fs.nr_open" in values:
        check(values["fs.nr_open"][0] >= int(limit[0]), "90-nudge.conf: fs.nr_open must be >= LimitNOFILE in nudge.service")
    for key in ("fs.file-max", "fs.nr_open", "net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
                "net.ipv4.ip_local_port_range", "net.ipv4.tcp_mem", "net.ipv4.tcp_rmem",
                "net.ipv4.tcp_wmem", "net.netfilter.nf_conntrack_max"):
        check(key in values, f"90-nudge.conf: {key} is missing")
    if "fs.file-max" in values:
        check(values["fs.file-max"][0] >= 1_000_000, "90-nudge.conf: fs.file-max below a million")
    for key in ("net.ipv4.tcp_mem", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
        v = values.get(key, [])
        check(len(v) == 3 and v[0] <= v[1] <= v[2], f"90-nudge.conf: {key} must be three ascending numbers")


# ---------------------------------------------------------------- Kubernetes
def k8s_docs():
    docs = []
    for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_all(path):
            docs.append((path, doc))
    return docs


def containers_of(doc):
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec, spec.get("containers", [])


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def kubernetes():
    docs = k8s_docs()
    check(docs, "no Kubernetes manifests found")
    # Every resource a kustomization lists exists, and every manifest is listed.
    for kust in (DEPLOY / "kubernetes").rglob("kustomization.yaml"):
        k = load_all(kust)[0]
        listed = set(k.get("resources", []))
        for r in listed:
            check((kust.parent / r).exists(), f"{kust}: lists missing {r}")
        for f in kust.parent.glob("*.yaml"):
            if f.name != "kustomization.yaml":
                check(f.name in listed, f"{kust}: does not list {f.name}")
    by_dir = {}
    for path, doc in docs:
        check("apiVersion" in doc and "kind" in doc and doc.get("metadata", {}).get("name"),
              f"{path}: a document lacks apiVersion, kind or metadata.name")
        by_dir.setdefault(path.parent.name, []).append(doc)
    for group in ("sidecar", "realtime"):
        check(group in by_dir, f"deploy/kubernetes/{group}/ is missing")
    for group, group_docs in by_dir.items():
        kinds = {}
        for d in group_docs:
            kinds.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
        workloads = [d for d in group_docs if d["kind"] in ("Deployment", "StatefulSet")]
        secrets = kinds.get("Secret", {})
        services = kinds.get("Service", {})
        for w in workloads:
            name = f"{group}/{w['kind']}/{w['metadata']['name']}"
            pod, containers = containers_of(w)
            labels = w["spec"]["template"]["metadata"].get("labels", {})
            sel = w["spec"]["selector"]["matchLabels"]
            check(all(labels.get(k) == v for k, v in sel.items()), f"{name}: selector does not match the pod labels")
            for vol in pod.get("volumes", []):
                ref = vol.get("secret", {}).get("secretName")
                # TLS material cannot be committed: the one Secret an operator
                # must create (the manifests say how).
                if ref and not ref.endswith("-tls"):
                    check(ref in secrets, f"{name}: volume uses Secret {ref}, not defined in {group}/")
            for c in containers:
                if "nudge" not in c["image"]:
                    continue
                env = env_of(c)
                cname = f"{name}/{c['name']}"
                for var in env:
                    if var.startswith("NUDGE_"):
                        check(var in NUDGE_ENV, f"{cname}: {var} is not a nudge flag")
                drain = seconds(env.get("NUDGE_DRAIN_PERIOD", {}).get("value", DEFAULT_DRAIN_SECONDS))
                pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
                pre_s = int(pre[1]) if pre[:1] == ["sleep"] else 0
                grace = pod.get("terminationGracePeriodSeconds", 30)
                check(grace > drain + pre_s, f"{cname}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_s}s + drain {drain}s")
                internal = env.get("NUDGE_INTERNAL_LISTEN", {}).get("value", "127.0.0.1:8081")
                if not internal.startswith(("127.", "[::1]", "localhost")):
                    check("NUDGE_INTERNAL_TOKEN_FILE" in env, f"{cname}: non-loopback internal listener without a token file")
                probes = {k: c.get(k, {}) for k in ("readinessProbe", "livenessProbe")}
                for kind, path_ in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                    p = probes[kind]
                    got = p.get("httpGet", {}).get("path") or " ".join(p.get("exec", {}).get("command", []))
                    check(path_ in (got or ""), f"{cname}: {kind} must check {path_}")
                    if "httpGet" in p:
                        check(not internal.startswith("127."), f"{cname}: kubelet cannot httpGet a 127.0.0.1 listener; use exec")
                        ports = {pp.get("name") for pp in c.get("ports", [])}
                        check(p["httpGet"]["port"] in ports, f"{cname}: {kind} port {p['httpGet']['port']} is not a container port")
                check(c.get("resources", {}).get("requests") and c["resources"].get("limits", {}).get("memory"),
                      f"{cname}: give resource requests and a memory limit")
                sc = c.get("securityContext", {})
                check(sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True,
                      f"{cname}: securityContext must forbid privilege escalation and use a read-only root")
                if w["kind"] == "StatefulSet":
                    check(env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
                          f"{cname}: POD_NAME must come from the downward API (metadata.name)")
                    order = list(env)
                    url = env.get("NUDGE_PUBLIC_URL", {}).get("value", "")
                    check("$(POD_NAME)" in url and order.index("POD_NAME") < order.index("NUDGE_PUBLIC_URL"),
                          f"{cname}: NUDGE_PUBLIC_URL must be built from $(POD_NAME), defined before it")
                    check("NUDGE_REDIS_URL" in env, f"{cname}: a multi-node tier needs the Redis bus")
        # Services select existing pods and target existing ports.
        pod_ports = {}
        for w in workloads:
            labels = w["spec"]["template"]["metadata"]["labels"]
            ports = {p.get("name") for c in containers_of(w)[1] for p in c.get("ports", [])}
            pod_ports[w["metadata"]["name"]] = (labels, ports, w)
        for sname, svc in services.items():
            sel = dict(svc["spec"].get("selector", {}))
            pod_name = sel.pop("statefulset.kubernetes.io/pod-name", None)
            match = [(ports, w) for labels, ports, w in pod_ports.values()
                     if all(labels.get(k) == v for k, v in sel.items())]
            if not check(match, f"{group}/Service/{sname}: selects no pod"):
                continue
            ports, w = match[0]
            for p in svc["spec"]["ports"]:
                check(p.get("targetPort") in ports, f"{group}/Service/{sname}: targetPort {p.get('targetPort')} is not a pod port")
            if pod_name:
                ordinal = int(pod_name.rsplit("-", 1)[1])
                check(w["kind"] == "StatefulSet" and pod_name.rsplit("-", 1)[0] == w["metadata"]["name"]
                      and ordinal < w["spec"]["replicas"], f"{group}/Service/{sname}: no pod {pod_name}")
        for sts in kinds.get("StatefulSet", {}).values():
            svc = services.get(sts["spec"]["serviceName"])
            check(svc and svc["spec"].get("clusterIP") == "None", f"{group}: StatefulSet needs its headless Service {sts['spec']['serviceName']}")
            # One Ingress rule, to its own per-pod Service, for every pod.
            rules = {}
            for ing in kinds.get("Ingress", {}).values():
                for r in ing["spec"].get("rules", []):
                    for p in r["http"]["paths"]:
                        rules[r["host"]] = p["backend"]["service"]
            name = sts["metadata"]["name"]
            env = env_of(containers_of(sts)[1][0])
            url = env["NUDGE_PUBLIC_URL"]["value"]
            for i in range(sts["spec"]["replicas"]):
                host = re.sub(r"^https?://", "", url.replace("$(POD_NAME)", f"{name}-{i}")).split("/")[0]
                backend = rules.get(host)
                if check(backend, f"{group}: no Ingress rule for {host}"):
                    target = services.get(backend["name"], {})
                    check(target.get("spec", {}).get("selector", {}).get("statefulset.kubernetes.io/pod-name") == f"{name}-{i}",
                          f"{group}: Ingress rule {host} does not lead to pod {name}-{i}")
            check(len(rules) == sts["spec"]["replicas"], f"{group}: {len(rules)} Ingress rules for {sts['spec']['replicas']} pods")
            for ing in kinds.get("Ingress", {}).values():
                ann = ing["metadata"].get("annotations", {})
                check(int(ann.get("nginx.ingress.kubernetes.io/proxy-read-timeout", 60)) > 60,
                      f"{group}: the Ingress must wait longer than a parked poll (proxy-read-timeout > 60)")
            redis = [u for u in [env.get("NUDGE_REDIS_URL", {}).get("value", "")] if u]
            for u in redis:
                host = re.sub(r"^rediss?://", "", u).split(":")[0].split("/")[0]
                check(host in services, f"{group}: NUDGE_REDIS_URL names {host}, which is not a Service here")


def servicemonitor():
    sm = load_all(DEPLOY / "prometheus/servicemonitor.yaml")[0]
    check(sm.get("apiVersion") == "monitoring.coreos.com/v1" and sm.get("kind") == "ServiceMonitor",
          "servicemonitor.yaml: not a monitoring.coreos.com/v1 ServiceMonitor")
    spec = sm.get("spec", {})
    sel = spec.get("selector", {}).get("matchLabels", {})
    services = [d for d in load_all(DEPLOY / "kubernetes/realtime/services.yaml") if d["kind"] == "Service"]
    picked = [s for s in services if all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
    check(len(picked) == 1 and picked[0]["spec"].get("clusterIP") == "None",
          f"servicemonitor.yaml: must select exactly the headless Service, selects {[s['metadata']['name'] for s in picked]}")
    secret = load_all(DEPLOY / "kubernetes/realtime/secret.yaml")[0]
    for ep in spec.get("endpoints", []):
        if picked:
            check(ep.get("port") in {p["name"] for p in picked[0]["spec"]["ports"]},
                  f"servicemonitor.yaml: port {ep.get('port')} is not on the Service")
        check(ep.get("path") == "/metrics", "servicemonitor.yaml: path must be /metrics")
        cred = ep.get("authorization", {}).get("credentials", {})
        check(ep.get("authorization", {}).get("type") == "Bearer"
              and cred.get("name") == secret["metadata"]["name"]
              and cred.get("key") in secret.get("stringData", {}),
              "servicemonitor.yaml: must send the internal token Secret as Bearer credentials")
    if picked:
        job = picked[0]["metadata"]["labels"].get(spec.get("jobLabel", ""), None)
        check(job == "nudge", "servicemonitor.yaml: jobLabel must make job=\"nudge\", as the alerts expect")


# ------------------------------------------------------------------- metrics
def exprs_in_alerts():
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def dashboard_exprs(dash):
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


PROMQL_WORDS = {"sum", "by", "without", "rate", "increase", "changes", "histogram_quantile",
                "clamp_min", "time", "min", "max", "avg", "count", "on", "ignoring",
                "group_left", "group_right", "and", "or", "unless", "bool", "offset", "le"}


def metric_names(expr):
    expr = re.sub(r'"[^"]*"', '""', expr)       # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)        # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)       # ranges
    expr = re.sub(r"\([^()]*\)\s*\(", "(", expr)  # `by (a, b) (` label lists
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b", expr))
    return {n for n in names if n not in PROMQL_WORDS and not n.startswith("__") and not re.fullmatch(r"\d.*", n)}


def names():
    """Flags and metrics named anywhere in deploy/ exist in nudge's interface."""
    used = []
    for e in exprs_in_alerts():
        used.append(("alerts.yml", e))
    dash = json.loads((DEPLOY / "grafana/nudge-dashboard.json").read_text())
    for title, e in dashboard_exprs(dash):
        used.append((f"dashboard panel {title!r}", e))
    tests = yaml.safe_load((DEPLOY / "prometheus/alerts_test.yml").read_text())
    for t in tests["tests"]:
        for s in t.get("input_series", []):
            used.append(("alerts_test.yml", s["series"]))
    for where, e in used:
        for n in metric_names(e):
            check(n in METRICS, f"{where}: unknown metric {n} in {e!r}")
        for o in re.findall(r'outcome="([^"]+)"', e):
            check(o in POLL_OUTCOMES, f"{where}: unknown poll outcome {o}")
        for o in re.findall(r'source="([^"]+)"', e):
            check(o in PUBLISH_SOURCES, f"{where}: unknown publish source {o}")
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in ("", ".yml", ".yaml", ".env", ".service", ".conf", ".md", ".sh"):
            for var in set(re.findall(r"\b(NUDGE_[A-Z_]+)\b", path.read_text(errors="replace"))):
                check(var in NUDGE_ENV | API_ENV | {"NUDGE_DEPLOY_TOOLS"}, f"{path}: {var} is not one of nudge's flags")


# ------------------------------------------------------------------- grafana
def grafana():
    path = DEPLOY / "grafana/nudge-dashboard.json"
    dash = json.loads(path.read_text())
    for key in ("title", "uid", "panels", "schemaVersion", "templating"):
        check(key in dash, f"{path}: missing {key}")
    variables = {v["name"] for v in dash["templating"]["list"]}
    check("datasource" in variables, f"{path}: needs a datasource variable, so it imports into any Grafana")
    ids, cells = set(), {}
    for p in dash["panels"]:
        check(p["id"] not in ids, f"{path}: duplicate panel id {p['id']}")
        ids.add(p["id"])
        g = p["gridPos"]
        check(g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, f"{path}: panel {p['title']!r} is outside the 24-column grid")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                check((x, y) not in cells, f"{path}: panels {cells.get((x, y))!r} and {p['title']!r} overlap")
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        check(p.get("datasource", {}).get("uid") == "${datasource}", f"{path}: panel {p['title']!r} must use ${{datasource}}")
        refs = [t.get("refId") for t in p.get("targets", [])]
        check(refs and len(refs) == len(set(refs)), f"{path}: panel {p['title']!r} needs targets with distinct refIds")
        for t in p.get("targets", []):
            for var in re.findall(r"\$(\w+)", t["expr"]):
                check(var in variables or var.startswith("__"), f"{path}: panel {p['title']!r} uses undefined ${var}")
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for want in ("parked", "channels", "topics", "open connections", "outcomes", "publishes", "wake",
                 "fan-out", "bus connected", "bus gaps", "per parked poll", "file descriptors"):
        check(want in titles, f"{path}: no panel about {want}")
    exprs = " ".join(e for _, e in dashboard_exprs(dash))
    check("histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs, f"{path}: fan-out p50 and p99")


def grafana_rules(out):
    """Write the dashboard's queries as recording rules, for promtool to parse."""
    dash = json.loads((DEPLOY / "grafana/nudge-dashboard.json").read_text())
    subst = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m",
             "$instance": ".*", "$job": "nudge"}
    rules = []
    for i, (title, expr) in enumerate(dashboard_exprs(dash)):
        for k, v in subst.items():
            expr = expr.replace(k, v)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    Path(out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))


# ------------------------------------------------------------------- compose
def compose():
    path = DEPLOY / "compose/docker-compose.yml"
    doc = yaml.safe_load(path.read_text())
    services = doc["services"]
    nodes = {n: s for n, s in services.items() if s.get("image", "").startswith("nudge")}
    check(len(nodes) == 3, f"{path}: expected three nudge nodes, found {sorted(nodes)}")
    for name in ("redis", "nginx", "prometheus"):
        check(name in services, f"{path}: no {name} service")
    nginx = (DEPLOY / "compose/nginx.conf").read_text()
    server_names = set(re.findall(r"server_name\s+([^;\s]+);", nginx))
    upstreams = dict(re.findall(r"upstream\s+(\S+)\s*\{\s*server\s+([^;\s]+);", nginx))
    targets = yaml.safe_load((DEPLOY / "compose/prometheus-targets.yml").read_text())
    scraped = {t for group in targets for t in group["targets"]}
    for name, svc in nodes.items():
        env = svc.get("environment", {})
        url = env.get("NUDGE_PUBLIC_URL", "")
        host = re.sub(r"^https?://", "", url).split(":")[0].split("/")[0]
        check(host in server_names, f"{path}: {name}'s public host {host!r} has no nginx server block")
        check(upstreams.get(name) == f"{name}:8080", f"nginx.conf: no upstream {name} -> {name}:8080")
        check(f"{name}:8081" in scraped, f"prometheus-targets.yml: {name}:8081 is not scraped")
        check(env.get("NUDGE_REDIS_URL", "").startswith("redis://redis:"), f"{path}: {name} must use the redis service as its bus")
        for var in env:
            if var.startswith("NUDGE_"):
                check(var in NUDGE_ENV, f"{path}: {name}: {var} is not a nudge flag")
        drain = seconds(env.get("NUDGE_DRAIN_PERIOD", DEFAULT_DRAIN_SECONDS))
        check(seconds(svc.get("stop_grace_period", "10s")) > drain, f"{path}: {name}: stop_grace_period must exceed the drain period")
        check(svc.get("secrets"), f"{path}: {name}: needs the internal token secret")
    m = re.search(r"proxy_read_timeout\s+(\S+);", nginx)
    check(m and seconds(m.group(1)) > 60, "nginx.conf: proxy_read_timeout must exceed a parked poll (60 s)")
    check(re.search(r"proxy_buffering\s+off;", nginx), "nginx.conf: proxy_buffering off")
    check(not re.search(r"log_format[^;]*\$(request|args|query_string|request_uri)\b", nginx, re.S),
          "nginx.conf: the access log must not record query strings (channel ids are credentials)")
    token = DEPLOY / "compose/dev-internal-token"
    check(token.exists() and token.stat().st_mode & 0o004, f"{token}: must exist and be world-readable (containers run as other uids)")


COMMANDS = {
    "dockerfile": dockerfile, "systemd": systemd, "sysctl": sysctl, "kubernetes": kubernetes,
    "servicemonitor": servicemonitor, "names": names, "grafana": grafana,
    "grafana-rules": grafana_rules, "compose": compose,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: checks.py {{{','.join(COMMANDS)}}} [ARGS]")
    try:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    except Exception as e:  # a crash is a failed check, with its reason
        problem(f"{type(e).__name__}: {e}")
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)
