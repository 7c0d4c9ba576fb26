#!/usr/bin/env python3
"""The services on an authenticated Kafka with exactly the ACLs of k8s/base/kafka.yaml.

A private broker (the stack's Kafka jars) with one SASL_SSL listener (SCRAM-SHA-512 over TLS, a
CA made here with openssl), the StandardAuthorizer and no access without an ACL, as Strimzi runs
it. The users and their ACLs are read from the KafkaUsers of the rendered `k8s/overlays/dev` (so
what is deployed is what is tested); the services log in with TALLY_KAFKA_SECURITY_PROTOCOL=
sasl_ssl, their passwords given as files (TALLY_KAFKA_SASL_PASSWORD_FILE).

It checks that each service can do its work with its ACLs, and cannot do what they do not grant:
  - the consumer publishes the control snapshot, the ingest (reading Kafka only) authenticates a
    key from it, accepts events and dead-letters an invalid one; the consumer stores the events
    in ClickHouse; `tally-consumer dlq list` reads the dead letter back (its reader group)
  - `tally-archiver run` reads the dead-letter topic (its group) and exits cleanly
  - the ingest's user cannot read the events, the consumer's cannot write them, the archiver's
    cannot read them; a wrong password is refused

  dev/kafka_auth_check.py --bin-dir DIR --kafka-libs DIR --clickhouse-url URL
"""

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMIN_TOKEN = "auth-check-admin-token-0123456789"


def log(message):
    print(f"[kafka-auth] {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, seconds, process=None):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the process for port {port} exited ({process.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"nothing listens on {port} after {seconds} s")


def http(method, url, body=None, headers=None, timeout=5):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def until(what, check, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out after {seconds} s: {what}")


def kafka_users():
    """KafkaUser name -> [(resource type, name, [operations])] from the rendered dev overlay."""
    import yaml  # PyYAML, from the k8s tools' virtualenv (dev/tools.sh k8s)

    rendered = subprocess.run(["kubectl", "kustomize", os.path.join(ROOT, "k8s", "overlays", "dev")],
                              check=True, capture_output=True, text=True).stdout
    users = {}
    for doc in yaml.safe_load_all(rendered):
        if doc and doc["kind"] == "KafkaUser":
            users[doc["metadata"]["name"]] = [
                (acl["resource"]["type"], acl["resource"]["name"], acl["operations"])
                for acl in doc["spec"]["authorization"]["acls"]
            ]
    return users


class Broker:
    def __init__(self, libs, work, users):
        self.libs, self.work = libs, work
        self.port, self.controller = free_port(), free_port()
        self.passwords = {name: secrets.token_hex(12) for name in ["admin", *users]}
        self.process = None

    def java(self, *args, **kwargs):
        return subprocess.run(["java", "-cp", os.path.join(self.libs, "*"),
                               f"-Dlog4j2.configurationFile={ROOT}/dev/kafka/log4j2.properties", *args],
                              capture_output=True, text=True, timeout=120, **kwargs)

    def certificates(self):
        w = self.work
        run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=w)  # noqa: E731
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", "/CN=tally-test-ca")
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
            "-subj", "/CN=127.0.0.1")
        with open(os.path.join(w, "san.ext"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\n")
        run("openssl", "x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "broker.crt", "-days", "2", "-extfile", "san.ext")
        run("openssl", "pkcs12", "-export", "-in", "broker.crt", "-inkey", "broker.key", "-out", "broker.p12",
            "-passout", "pass:changeit")
        self.ca = os.path.join(w, "ca.crt")

    def jaas(self, user):
        return ('org.apache.kafka.common.security.scram.ScramLoginModule required '
                f'username="{user}" password="{self.passwords[user]}";')

    def start(self):
        self.certificates()
        data = os.path.join(self.work, "data")
        properties = os.path.join(self.work, "server.properties")
        with open(properties, "w") as f:
            f.write(f"""process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{self.controller}
listeners=SASL_SSL://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller}
advertised.listeners=SASL_SSL://127.0.0.1:{self.port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_SSL
listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={self.jaas("admin")}
ssl.keystore.type=PKCS12
ssl.keystore.location={self.work}/broker.p12
ssl.keystore.password=changeit
ssl.truststore.type=PEM
ssl.truststore.location={self.work}/ca.crt
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
# admin: the tool's user; ANONYMOUS: the broker's own requests on the loopback controller listener
super.users=User:admin;User:ANONYMOUS
log.dirs={data}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
message.max.bytes=8388608
""")
        scram = []
        for user, password in self.passwords.items():
            scram += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
        formatted = self.java("kafka.tools.StorageTool", "format", "-t", str(uuid.uuid4()).replace("-", "")[:22],
                              "-c", properties, *scram)
        if formatted.returncode != 0:
            raise SystemExit(f"kafka storage format failed: {formatted.stdout}{formatted.stderr}")
        self.log = open(os.path.join(self.work, "kafka.log"), "w")
        self.process = subprocess.Popen(
            ["java", "-Xmx512m", "-cp", os.path.join(self.libs, "*"),
             f"-Dlog4j2.configurationFile={ROOT}/dev/kafka/log4j2.properties", "kafka.Kafka", properties],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, 90, self.process)
        self.admin = self.client_properties("admin")

    def client_properties(self, user, password=None):
        path = os.path.join(self.work, f"{user}.properties")
        with open(path, "w") as f:
            jaas = self.jaas(user) if password is None else self.jaas(user).replace(self.passwords[user], password)
            f.write(f"security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\nsasl.jaas.config={jaas}\n"
                    f"ssl.truststore.type=PEM\nssl.truststore.location={self.ca}\n")
        return path

    def tool(self, tool, *args):
        """A Kafka admin tool as the super user."""
        return self.java(tool, "--bootstrap-server", f"127.0.0.1:{self.port}", "--command-config", self.admin, *args)

    def create_topic(self, name, partitions, *config):
        out = self.tool("org.apache.kafka.tools.TopicCommand", "--create", "--topic", name, "--partitions",
                        str(partitions), "--replication-factor", "1", *config)
        if out.returncode != 0:
            raise SystemExit(f"creating {name}: {out.stdout}{out.stderr}")

    def grant(self, user, resource, name, operations):
        flag = {"topic": "--topic", "group": "--group", "cluster": "--cluster", "transactionalId": "--transactional-id"}
        args = ["--add", "--allow-principal", f"User:{user}", "--resource-pattern-type", "literal"]
        for operation in operations:
            args += ["--operation", operation]
        args += [flag[resource]] + ([name] if resource != "cluster" else [])
        out = self.tool("org.apache.kafka.tools.AclCommand", *args)
        if out.returncode != 0:
            raise SystemExit(f"ACL for {user}: {out.stdout}{out.stderr}")

    def console(self, user, kind, topic, password=None, stdin=None):
        """A console consumer or producer as `user`; returns its combined output."""
        properties = self.client_properties(user, password)
        if kind == "consume":
            args = ["org.apache.kafka.tools.consumer.ConsoleConsumer", "--bootstrap-server", f"127.0.0.1:{self.port}",
                    "--consumer.config", properties, "--topic", topic, "--from-beginning", "--timeout-ms", "8000",
                    "--group", f"{user}-probe"]
        else:
            args = ["org.apache.kafka.tools.ConsoleProducer", "--bootstrap-server", f"127.0.0.1:{self.port}",
                    "--producer.config", properties, "--topic", topic,
                    "--producer-property", "max.block.ms=8000", "--producer-property", "delivery.timeout.ms=8000",
                    "--producer-property", "request.timeout.ms=7000"]
        out = self.java(*args, input=stdin)
        return out.stdout + out.stderr

    def stop(self):
        if self.process:
            self.process.kill()
            self.process.wait()


class Service:
    def __init__(self, bin_dir, binary, env, work, args=()):
        self.name = binary
        self.log_path = os.path.join(work, f"{binary}.log")
        self.process = subprocess.Popen([os.path.join(bin_dir, binary), *args], env=env,
                                        stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def tail(self):
        with open(self.log_path) as f:
            return "".join(f.readlines()[-20:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--kafka-libs", required=True)
    parser.add_argument("--clickhouse-url", default="http://127.0.0.1:8123")
    parser.add_argument("--without", metavar="USER:RESOURCE", default="",
                        help="leave out one ACL (e.g. tally-ingest:tally.control.v1) to see the check fail")
    args = parser.parse_args()
    users = kafka_users()
    if args.without:
        user, resource = args.without.split(":", 1)
        users[user] = [acl for acl in users[user] if acl[1] != resource]
    log(f"KafkaUsers from k8s/overlays/dev: {', '.join(f'{u} ({len(a)} ACLs)' for u, a in users.items())}")
    work = tempfile.mkdtemp(prefix="tally-kafka-auth-")
    broker = Broker(args.kafka_libs, work, users)
    services = []
    database = f"tally_auth_{secrets.token_hex(4)}"
    failures = []

    def check(ok, what):
        log(("ok    " if ok else "FAILED ") + what)
        if not ok:
            failures.append(what)

    try:
        broker.start()
        log(f"broker on 127.0.0.1:{broker.port}: SASL_SSL, SCRAM-SHA-512, StandardAuthorizer, no ACL = no access")
        broker.create_topic("tally.events.v1", 4)
        broker.create_topic("tally.events.dlq.v1", 1)
        broker.create_topic("tally.control.v1", 1, "--config", "cleanup.policy=compact")
        for user, acls in users.items():
            for resource, name, operations in acls:
                broker.grant(user, resource, name, operations)
        password_files = {}
        for user in users:
            password_files[user] = os.path.join(work, f"{user}.password")
            with open(password_files[user], "w") as f:
                f.write(broker.passwords[user] + "\n")
        base = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        base.update({
            "TALLY_KAFKA_BROKERS": f"127.0.0.1:{broker.port}",
            "TALLY_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "TALLY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "TALLY_KAFKA_SSL_CA_LOCATION": broker.ca,
            "TALLY_CLICKHOUSE_URL": args.clickhouse_url,
            "TALLY_CLICKHOUSE_DATABASE": database,
            "TALLY_CONTROL_TOPIC": "tally.control.v1",
            "TALLY_LOG": "info",
        })

        def env(user, **extra):
            return dict(base, TALLY_KAFKA_SASL_USERNAME=user, TALLY_KAFKA_SASL_PASSWORD_FILE=password_files[user], **extra)

        query_port, consumer_port, ingest_port = free_port(), free_port(), free_port()
        query = f"http://127.0.0.1:{query_port}"
        ingest = f"http://127.0.0.1:{ingest_port}"
        # The query API uses no Kafka.
        services.append(Service(args.bin_dir, "tally-query-api", dict(
            base, TALLY_LISTEN_ADDR=f"127.0.0.1:{query_port}", TALLY_ADMIN_TOKEN=ADMIN_TOKEN,
            TALLY_KAFKA_SECURITY_PROTOCOL="plaintext"), work))
        until("the query API is ready (migrations applied)", lambda: http("GET", query + "/readyz")[0] == 200, 60)
        consumer = Service(args.bin_dir, "tally-consumer", env(
            "tally-consumer", TALLY_LISTEN_ADDR=f"127.0.0.1:{consumer_port}", TALLY_CONTROL_INTERVAL_MS="300",
            TALLY_BATCH_MAX_WAIT_MS="200", TALLY_MIGRATE="false"), work)
        services.append(consumer)
        # The ingest knows ClickHouse only as a closed port: keys and prices come through Kafka.
        services.append(Service(args.bin_dir, "tally-ingest", env(
            "tally-ingest", TALLY_LISTEN_ADDR=f"127.0.0.1:{ingest_port}", TALLY_INGEST_CONTROL="kafka",
            TALLY_CLICKHOUSE_URL="http://127.0.0.1:9"), work))
        status, body = http("POST", query + "/admin/orgs", {"name": "auth-check", "plan": "ENTERPRISE"},
                            {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        if status != 201:
            raise SystemExit(f"POST /admin/orgs: {status} {body!r}")
        key = json.loads(body)["apiKey"]
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 5))
        good = {"timestamp": now, "provider": "openai", "model": "gpt-4o", "latency": 100, "status": "success",
                "tokens": {"promptTokens": 10, "completionTokens": 5, "totalTokens": 15}, "error": None}
        batch = {"events": [dict(good) for _ in range(5)] + [dict(good, tokens="not an object")]}
        answer = {}

        def accepted():
            status, body = http("POST", ingest + "/v1/ingest", batch, {"X-API-Key": key})
            answer.update(status=status, body=body)
            return status in (202, 207)

        try:
            until("the ingest accepts the key it read from the control topic", accepted, 60)
        except SystemExit:
            log(f"last answer {answer}; ingest log:\n" + services[-1].tail() + "\nconsumer log:\n" + consumer.tail())
            raise
        check(True, f"ingest (tally-ingest) read the control topic and produced: {answer['status']} "
                    f"{answer['body'].decode()[:80]}")
        time.sleep(2)
        refused = [line for s in services for line in s.tail().splitlines() if "uthoriz" in line]
        check(not refused, f"no service logged an authorization failure{': ' + refused[0][:300] if refused else ''}")

        def stored():
            q = urllib.parse.quote(f"SELECT count() FROM {database}.events")
            status, body = http("GET", f"{args.clickhouse_url}/?query={q}")
            return status == 200 and body.strip() == b"5"

        try:
            until("the consumer stores the 5 events", stored, 60)
            check(True, "consumer (tally-consumer) read the events in its group and stored them in ClickHouse")
        except SystemExit as e:
            check(False, f"consumer stored the events: {e}; log:\n{consumer.tail()}")
        letters = subprocess.run([os.path.join(args.bin_dir, "tally-consumer"), "dlq", "list", "10"],
                                 env=env("tally-consumer"), capture_output=True, text=True, timeout=60)
        letter = next((line for line in letters.stdout.splitlines() if '"stage":"ingest"' in line.replace(" ", "")), "")
        check(letters.returncode == 0 and bool(letter),
              "the ingest's dead letter is in the DLQ, read back by `tally-consumer dlq list` "
              f"(group tally-consumer-dlq-reader): {letter[:90] or (letters.stdout + letters.stderr).strip()[-300:]}")
        archive = os.path.join(work, "archive")
        archiver = subprocess.run([os.path.join(args.bin_dir, "tally-archiver"), "run"],
                                  env=env("tally-archiver", TALLY_ARCHIVE_URL=f"file://{archive}",
                                          TALLY_ARCHIVE_DLQ_DAYS="2", TALLY_ARCHIVE_DLQ_MARGIN_MINUTES="0"),
                                  capture_output=True, text=True, timeout=120)
        output = archiver.stdout + archiver.stderr
        refused = [line for line in output.splitlines() if "uthoriz" in line]
        check(archiver.returncode == 0 and not refused,
              "archiver (tally-archiver) read the dead-letter topic: "
              f"exit {archiver.returncode}{'' if archiver.returncode == 0 and not refused else ': ' + (refused[:1] or [output[-300:]])[0][:300]}")

        denied = ("TopicAuthorizationException", "GroupAuthorizationException", "Not authorized", "not authorized")
        for user, kind, topic, why in [
            ("tally-ingest", "consume", "tally.events.v1", "the ingest cannot read the events"),
            ("tally-archiver", "consume", "tally.events.v1", "the archiver cannot read the events"),
            ("tally-consumer", "produce", "tally.events.v1", "the consumer cannot write the events"),
            ("tally-ingest", "produce", "tally.control.v1", "the ingest cannot write the control topic"),
        ]:
            out = broker.console(user, kind, topic, stdin="x\n")
            check(any(d in out for d in denied), f"{why} ({user}: refused)")
        out = broker.console("tally-ingest", "consume", "tally.control.v1", password="wrong-password")
        check("Authentication failed" in out or "SaslAuthenticationException" in out,
              "a wrong password is refused (SCRAM authentication failed)")
    finally:
        for service in reversed(services):
            service.stop()
        broker.stop()
        urllib.request.urlopen(urllib.request.Request(
            f"{args.clickhouse_url}/", data=f"DROP DATABASE IF EXISTS {database}".encode(), method="POST"), timeout=30)
        if not failures and sys.exc_info()[0] is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work} (logs of the broker and the services)")
    log(f"{'PASSED' if not failures else 'FAILED'}: {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
