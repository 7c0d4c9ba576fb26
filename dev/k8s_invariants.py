#!/usr/bin/env python3
"""What k8s/ must hold beyond its schemas, checked on a rendered overlay (dev/k8s_check.sh).

  check RENDER --docs docs/deploy.md      the invariants; exit 1 with every violation listed
  self-test RENDER --docs docs/deploy.md  breaks each invariant on purpose; each must be caught
  mutate-schema RENDER DIR                renders broken on purpose for the schema validator
  rules RENDER OUT                        the PrometheusRule's groups as a Prometheus rule file
  policy-skips POLICY.md                  the justified checkov skips, comma separated

The invariants:
  - every pod of Tally: non-root (runAsNonRoot, a non-zero uid), seccomp RuntimeDefault, no
    service-account token; every container and init container: CPU and memory requests and
    limits, read-only root filesystem, no privilege escalation, every capability dropped
  - every Deployment's container: readiness on /readyz and liveness on /healthz at its port;
    terminationGracePeriodSeconds longer than the drain (TALLY_SHUTDOWN_TIMEOUT_MS)
  - HPAs: their target exists, min <= replicas <= max, the consumer's max does not exceed the
    events topic's partitions (a consumer beyond them would idle), and the ingest's share of each
    org's limit (TALLY_INGEST_REPLICAS) is its minReplicas
  - every Secret referenced (env, volumes, the ClickHouseInstallation) is in docs/deploy.md's
    table of Secrets, and every Secret listed there is referenced; every *_FILE setting points
    into a volume mounted in that container
  - the Kafka users the services log in as exist, with ACLs on the topics the ConfigMap names;
    the ingest reads its keys from the control topic (TALLY_INGEST_CONTROL=kafka)
  - NetworkPolicies: a deny-all selecting every Tally pod, and each service's peers, computed from
    the policies, equal exactly EXPECTED_PEERS below
"""

import copy
import re
import sys
from pathlib import Path

import yaml

# The issue's table: who each component may reach (egress) and who may reach it (ingress).
EXPECTED_PEERS = {
    "ingest": {"egress": {"dns", "kafka"}, "ingress": {"clients:8080"}},
    "consumer": {"egress": {"dns", "kafka", "clickhouse"}, "ingress": {"prometheus:8082"}},
    "query-api": {"egress": {"dns", "clickhouse", "s3"}, "ingress": {"clients:8081"}},
    "archiver": {"egress": {"dns", "kafka", "clickhouse", "s3"}, "ingress": {"prometheus:8083"}},
    "migrate": {"egress": {"dns", "clickhouse"}, "ingress": set()},
}
WORKLOADS = ("Deployment", "Job", "CronJob")


def load(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def pod_spec(obj):
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def named(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def config_map(docs):
    maps = named(docs, "ConfigMap", "tally-config")
    return maps[0]["data"] if maps else {}


def container_env(container, config):
    env = dict(config) if any("configMapRef" in e for e in container.get("envFrom", [])) else {}
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "<from " + str(list(var.get("valueFrom", {}).keys())) + ">")
    return env


def check_pods(docs, errors):
    config = config_map(docs)
    drain_s = int(config.get("TALLY_SHUTDOWN_TIMEOUT_MS", "30000")) / 1000
    for obj in docs:
        if obj["kind"] not in WORKLOADS:
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        template = pod_spec(obj)
        spec = template["spec"]
        security = spec.get("securityContext", {})
        if security.get("runAsNonRoot") is not True or not security.get("runAsUser"):
            errors.append(f"{where}: the pod must run as non-root (runAsNonRoot and a non-zero runAsUser)")
        if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            errors.append(f"{where}: seccompProfile must be RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            errors.append(f"{where}: automountServiceAccountToken must be false (no service needs the API)")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if obj["kind"] != "Job" and grace <= drain_s:
            errors.append(f"{where}: terminationGracePeriodSeconds {grace} must exceed the drain ({drain_s:g} s)")
        mounts_by_container = {}
        for container in spec.get("initContainers", []) + spec["containers"]:
            cwhere = f"{where} container {container['name']}"
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(part, {}):
                        errors.append(f"{cwhere}: no {resource} {part[:-1]}")
            csec = container.get("securityContext", {})
            if csec.get("readOnlyRootFilesystem") is not True:
                errors.append(f"{cwhere}: readOnlyRootFilesystem must be true")
            if csec.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{cwhere}: allowPrivilegeEscalation must be false")
            if "ALL" not in csec.get("capabilities", {}).get("drop", []):
                errors.append(f"{cwhere}: capabilities must drop ALL")
            if csec.get("runAsUser") == 0 or csec.get("runAsNonRoot") is False:
                errors.append(f"{cwhere}: runs as root")
            mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
            mounts_by_container[container["name"]] = mounts
            for key, value in container_env(container, config).items():
                if key.endswith("_FILE") and not any(value.startswith(m.rstrip("/") + "/") for m in mounts):
                    errors.append(f"{cwhere}: {key}={value} is not under a mounted volume")
        if obj["kind"] == "Deployment":
            for container in spec["containers"]:
                cwhere = f"{where} container {container['name']}"
                ports = {p.get("name") for p in container.get("ports", [])} | {
                    p["containerPort"] for p in container.get("ports", [])
                }
                for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                    get = container.get(probe, {}).get("httpGet", {})
                    if get.get("path") != path or get.get("port") not in ports:
                        errors.append(f"{cwhere}: {probe} must GET {path} on the container's port")


def check_autoscaling(docs, errors):
    config = config_map(docs)
    deployments = {d["metadata"]["name"]: d for d in named(docs, "Deployment")}
    topics = {t["spec"].get("topicName", t["metadata"]["name"]): t for t in named(docs, "KafkaTopic")}
    events = topics.get(config.get("TALLY_EVENTS_TOPIC", "tally.events.v1"))
    for hpa in named(docs, "HorizontalPodAutoscaler"):
        where = f"HorizontalPodAutoscaler/{hpa['metadata']['name']}"
        target = hpa["spec"]["scaleTargetRef"]
        deployment = deployments.get(target["name"])
        low, high = hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
        if deployment is None or target["kind"] != "Deployment":
            errors.append(f"{where}: its target {target['kind']}/{target['name']} does not exist")
            continue
        if not low <= deployment["spec"].get("replicas", 1) <= high:
            errors.append(f"{where}: the Deployment's replicas are outside [{low}, {high}]")
        component = deployment["metadata"]["labels"].get("app.kubernetes.io/component")
        if component == "ingest":
            share = container_env(pod_spec(deployment)["spec"]["containers"][0], config).get("TALLY_INGEST_REPLICAS", "1")
            if share != str(low):
                errors.append(
                    f"{where}: TALLY_INGEST_REPLICAS={share} must equal minReplicas {low} (each replica enforces "
                    "1/N of an org's limit; docs/deploy.md, Scaling)"
                )
        if component == "consumer":
            if events is None:
                errors.append(f"{where}: no KafkaTopic for the events topic bounds the consumers")
            elif high > events["spec"]["partitions"]:
                errors.append(
                    f"{where}: maxReplicas {high} exceeds the events topic's {events['spec']['partitions']} "
                    "partitions (the extra consumers would idle)"
                )
    for pdb in named(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        matches = [d for d in deployments.values() if selector.items() <= pod_spec(d)["metadata"]["labels"].items()]
        if not matches:
            errors.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: selects no Deployment")
        for d in matches:
            if pdb["spec"].get("minAvailable", 0) >= d["spec"].get("replicas", 1):
                errors.append(
                    f"PodDisruptionBudget/{pdb['metadata']['name']}: minAvailable leaves no pod of "
                    f"{d['metadata']['name']} evictable (node drains would hang)"
                )


def secrets_referenced(docs):
    names = set()

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                names.add(node["secretKeyRef"]["name"])
            if "secret" in node and isinstance(node["secret"], dict) and "secretName" in node["secret"]:
                names.add(node["secret"]["secretName"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(docs)
    return names


def secrets_documented(deploy_md):
    text = Path(deploy_md).read_text()
    section = text.split("## Secrets", 1)[1].split("\n## ", 1)[0] if "## Secrets" in text else ""
    return set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, re.M))


def check_secrets(docs, deploy_md, errors):
    referenced, documented = secrets_referenced(docs), secrets_documented(deploy_md)
    for name in sorted(referenced - documented):
        errors.append(f"Secret {name} is referenced but not in docs/deploy.md's table of Secrets")
    for name in sorted(documented - referenced):
        errors.append(f"Secret {name} is documented in docs/deploy.md but nothing references it")
    if any(d["kind"] == "Secret" for d in docs):
        errors.append("a Secret object is committed: reference Secrets, never ship them")


def check_kafka_users(docs, errors):
    config = config_map(docs)
    for deployment in named(docs, "Deployment", "tally-ingest"):
        env = container_env(pod_spec(deployment)["spec"]["containers"][0], config)
        if env.get("TALLY_INGEST_CONTROL") != "kafka":
            errors.append("Deployment/tally-ingest: TALLY_INGEST_CONTROL must be kafka (it may not reach ClickHouse)")
    users = {u["metadata"]["name"]: u for u in named(docs, "KafkaUser")}
    topics = {config.get("TALLY_EVENTS_TOPIC"), config.get("TALLY_DLQ_TOPIC"), config.get("TALLY_CONTROL_TOPIC")}
    for obj in docs:
        if obj["kind"] not in WORKLOADS:
            continue
        for container in pod_spec(obj)["spec"]["containers"]:
            user = container_env(container, config).get("TALLY_KAFKA_SASL_USERNAME")
            if user is None:
                continue
            if user not in users:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']}: logs in as {user}, no KafkaUser of that name")
                continue
            acl_topics = {
                a["resource"]["name"] for a in users[user]["spec"]["authorization"]["acls"] if a["resource"]["type"] == "topic"
            }
            if not acl_topics <= topics:
                errors.append(f"KafkaUser/{user}: ACLs on {sorted(acl_topics - topics)}, topics the services do not use")


def selector_matches(selector, labels):
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def peer_name(peer, port):
    """What a policy peer at a port is: kafka, clickhouse, s3, dns, clients, prometheus, or raw."""
    if peer is None:  # no to/from: any address
        return {443: "s3"}.get(port, f"any:{port}")
    pod = (peer.get("podSelector") or {}).get("matchLabels", {})
    ns = peer.get("namespaceSelector")
    if pod.get("k8s-app") == "kube-dns" and port == 53:
        return "dns"
    if pod.get("strimzi.io/cluster") and port == 9093:
        return "kafka"
    if pod.get("clickhouse.altinity.com/chi") and port == 8123:
        return "clickhouse"
    if ns and ns.get("matchLabels", {}).get("tally.dev/monitoring") == "true" and not pod:
        return "prometheus"
    return f"{yaml.safe_dump(peer, default_flow_style=True).strip()}:{port}"


def peers(docs, labels, direction):
    found = set()
    for policy in named(docs, "NetworkPolicy"):
        spec = policy["spec"]
        if direction.capitalize() not in spec.get("policyTypes", []) or not selector_matches(spec["podSelector"], labels):
            continue
        for rule in spec.get(direction, []):
            ports = [p["port"] for p in rule.get("ports", [])] or ["*"]
            sides = rule.get("to" if direction == "egress" else "from") or [None]
            for side in sides:
                for port in ports:
                    name = peer_name(side, port)
                    if direction == "ingress":
                        name = f"clients:{port}" if side is None else f"{name}:{port}"
                    found.add(name)
    return found


def check_network(docs, errors):
    policies = named(docs, "NetworkPolicy")
    deny = [
        p for p in policies
        if set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    for obj in docs:
        if obj["kind"] in WORKLOADS:
            labels = pod_spec(obj)["metadata"]["labels"]
            if not any(selector_matches(p["spec"]["podSelector"], labels) for p in deny):
                errors.append(f"{obj['kind']}/{obj['metadata']['name']}: no default deny (Ingress and Egress, no rules) selects its pods")
    seen = set()
    for obj in docs:
        if obj["kind"] not in WORKLOADS:
            continue
        labels = pod_spec(obj)["metadata"]["labels"]
        component = labels.get("app.kubernetes.io/component")
        if component not in EXPECTED_PEERS:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: component {component!r} has no expected peers")
            continue
        seen.add(component)
        if "clickhouse" not in EXPECTED_PEERS[component]["egress"]:
            for container in pod_spec(obj)["spec"]["containers"]:
                held = [k for k in container_env(container, {}) if k.startswith("TALLY_CLICKHOUSE_PASSWORD")]
                if held:
                    errors.append(f"{component}: holds {held[0]} but may not reach ClickHouse")
        for direction in ("egress", "ingress"):
            got, want = peers(docs, labels, direction), EXPECTED_PEERS[component][direction]
            if got != want:
                errors.append(
                    f"{component} {direction}: the policies allow {sorted(got)}, expected exactly {sorted(want)}"
                )
    for component in sorted(set(EXPECTED_PEERS) - seen):
        errors.append(f"no workload of component {component}")


def violations(docs, deploy_md):
    errors = []
    check_pods(docs, errors)
    check_autoscaling(docs, errors)
    check_secrets(docs, deploy_md, errors)
    check_kafka_users(docs, errors)
    check_network(docs, errors)
    return errors


def find(docs, kind, name):
    return named(docs, kind, name)[0]


def first_container(docs, name):
    return pod_spec(find(docs, "Deployment", name))["spec"]["containers"][0]


# Each breaks one invariant; `self-test` requires each to be reported with the expected words.
def break_probe(docs):
    del first_container(docs, "tally-ingest")["readinessProbe"]
    return "readinessProbe must GET /readyz"


def break_root(docs):
    pod_spec(find(docs, "Deployment", "tally-consumer"))["spec"]["securityContext"]["runAsUser"] = 0
    return "must run as non-root"


def break_limits(docs):
    del first_container(docs, "tally-query-api")["resources"]["limits"]["memory"]
    return "no memory limit"


def break_init_limits(docs):
    del pod_spec(find(docs, "Deployment", "tally-consumer"))["spec"]["initContainers"][0]["resources"]["limits"]
    return "container wait-for-schema: no cpu limit"


def break_grace(docs):
    pod_spec(find(docs, "Deployment", "tally-ingest"))["spec"]["terminationGracePeriodSeconds"] = 20
    return "must exceed the drain"


def break_hpa(docs):
    find(docs, "HorizontalPodAutoscaler", "tally-consumer")["spec"]["maxReplicas"] = 64
    return "exceeds the events topic's"


def break_share(docs):
    find(docs, "HorizontalPodAutoscaler", "tally-ingest")["spec"]["minReplicas"] = 4
    find(docs, "Deployment", "tally-ingest")["spec"]["replicas"] = 4
    return "TALLY_INGEST_REPLICAS=3 must equal minReplicas 4"


def break_secret(docs):
    first_container(docs, "tally-ingest")["env"].append(
        {"name": "TALLY_X", "valueFrom": {"secretKeyRef": {"name": "tally-undocumented", "key": "k"}}}
    )
    return "Secret tally-undocumented is referenced but not in docs/deploy.md"


def break_file(docs):
    first_container(docs, "tally-ingest")["env"].append({"name": "TALLY_X_FILE", "value": "/etc/elsewhere/x"})
    return "is not under a mounted volume"


def break_egress(docs):
    find(docs, "NetworkPolicy", "tally-query-api")["spec"]["egress"].append(
        {"to": [{"podSelector": {"matchLabels": {"strimzi.io/cluster": "tally"}}}], "ports": [{"port": 9093}]}
    )
    return "query-api egress: the policies allow ['clickhouse', 'dns', 'kafka', 's3']"


def break_ingest_clickhouse(docs):
    find(docs, "NetworkPolicy", "tally-ingest")["spec"]["egress"].append(
        {"to": [{"podSelector": {"matchLabels": {"clickhouse.altinity.com/chi": "tally"}}}], "ports": [{"port": 8123}]}
    )
    return "ingest egress: the policies allow ['clickhouse', 'dns', 'kafka']"


def break_ingest_control(docs):
    env = first_container(docs, "tally-ingest")["env"]
    next(e for e in env if e["name"] == "TALLY_INGEST_CONTROL")["value"] = "clickhouse"
    return "TALLY_INGEST_CONTROL must be kafka"


def break_deny(docs):
    docs.remove(find(docs, "NetworkPolicy", "tally-default-deny"))
    return "no default deny"


def break_kafka_user(docs):
    docs.remove(find(docs, "KafkaUser", "tally-archiver"))
    return "logs in as tally-archiver, no KafkaUser"


BREAKS = [
    break_probe, break_root, break_limits, break_init_limits, break_grace, break_hpa, break_share, break_secret,
    break_file, break_egress, break_ingest_clickhouse, break_ingest_control, break_deny, break_kafka_user,
]


def self_test(docs, deploy_md):
    failures = 0
    for breaker in BREAKS:
        broken = copy.deepcopy(docs)
        expected = breaker(broken)
        found = violations(broken, deploy_md)
        if any(expected in e for e in found):
            print(f"[k8s] invariants: {breaker.__name__[6:]} caught ({expected})", file=sys.stderr)
        else:
            failures += 1
            print(f"[k8s] invariants: {breaker.__name__} NOT caught; wanted {expected!r}, got {found}", file=sys.stderr)
    return failures


# Broken renders for the schema validator: (description, function on the docs).
def schema_mutations():
    def misspelt(docs):
        first_container(docs, "tally-ingest")["securityContext"]["readOnlyRootFilesytem"] = True

    def replicas_string(docs):
        find(docs, "Deployment", "tally-query-api")["spec"]["replicas"] = "two"

    def partitions_string(docs):
        find(docs, "KafkaTopic", "tally-events-v1")["spec"]["partitions"] = "sixteen"

    def acl_operation(docs):
        find(docs, "KafkaUser", "tally-ingest")["spec"]["authorization"]["acls"][0]["operations"] = ["Wrtie"]

    def nodepool_role(docs):
        find(docs, "KafkaNodePool", "brokers")["spec"]["roles"] = ["borker"]

    def chi_layout(docs):
        find(docs, "ClickHouseInstallation", "tally")["spec"]["configuration"]["clusters"][0]["layout"]["shardsCount"] = "two"

    def chi_misspelt(docs):
        find(docs, "ClickHouseInstallation", "tally")["spec"]["configuraton"] = {}

    def keeper_replicas(docs):
        find(docs, "ClickHouseKeeperInstallation", "tally")["spec"]["configuration"]["clusters"][0]["layout"]["replicasCount"] = "three"

    def monitor_endpoints(docs):
        find(docs, "ServiceMonitor", "tally-ingest")["spec"]["endpoints"] = "http"

    def rule_misspelt(docs):
        find(docs, "PrometheusRule", "tally")["spec"]["groups"][0]["rules"][0]["expresion"] = "up"

    return [
        ("Deployment tally-ingest: readOnlyRootFilesytem (misspelt field)", misspelt),
        ("Deployment tally-query-api: replicas: \"two\" (string for an integer)", replicas_string),
        ("KafkaTopic tally-events-v1: partitions: \"sixteen\" (Strimzi, wrong type)", partitions_string),
        ("KafkaUser tally-ingest: operation Wrtie (Strimzi, not in the enum)", acl_operation),
        ("KafkaNodePool brokers: role borker (Strimzi, not in the enum)", nodepool_role),
        ("ClickHouseInstallation: shardsCount: \"two\" (Altinity, wrong type)", chi_layout),
        ("ClickHouseInstallation: configuraton (Altinity, misspelt field)", chi_misspelt),
        ("ClickHouseKeeperInstallation: replicasCount: \"three\" (Altinity, wrong type)", keeper_replicas),
        ("ServiceMonitor tally-ingest: endpoints: a string (Prometheus Operator, wrong type)", monitor_endpoints),
        ("PrometheusRule: expresion (Prometheus Operator, misspelt field)", rule_misspelt),
    ]


def main(argv):
    command = argv[1] if len(argv) > 1 else ""
    if command in ("check", "self-test"):
        render, deploy_md = argv[2], argv[argv.index("--docs") + 1]
        docs = load(render)
        if command == "check":
            errors = violations(docs, deploy_md)
            for e in errors:
                print(f"[k8s] invariant broken in {Path(render).stem}: {e}", file=sys.stderr)
            if not errors:
                print(f"[k8s] {Path(render).stem}: every invariant holds ({len(docs)} objects)", file=sys.stderr)
            return 1 if errors else 0
        return 1 if self_test(docs, deploy_md) else 0
    if command == "mutate-schema":
        docs, out = load(argv[2]), Path(argv[3])
        out.mkdir(parents=True, exist_ok=True)
        for i, (description, mutate) in enumerate(schema_mutations()):
            broken = copy.deepcopy(docs)
            mutate(broken)
            (out / f"{i:02d}.yaml").write_text(f"# {description}\n" + yaml.safe_dump_all(broken, sort_keys=False))
        return 0
    if command == "rules":
        rule = find(load(argv[2]), "PrometheusRule", "tally")
        Path(argv[3]).write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
        return 0
    if command == "policy-skips":
        skips = []
        for line in Path(argv[2]).read_text().splitlines():
            m = re.match(r"^\| `(CKV\w+)` \|(.*)\|(.*)\|\s*$", line)
            if m:
                if len(m.group(3).strip()) < 20:
                    print(f"[k8s] k8s/POLICY.md: {m.group(1)} is skipped without a reason", file=sys.stderr)
                    return 1
                skips.append(m.group(1))
        print(",".join(skips))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
