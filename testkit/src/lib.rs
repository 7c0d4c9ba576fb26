//! Test scaffolding, for tests only (a dev-dependency, never a dependency of a service): a fresh,
//! migrated database per test, topics, private Kafka and ClickHouse servers to stop and restart.

use rand::Rng;

use tally_common::ch::ChConfig;

/// The ClickHouse of the local stack, overridable with `TALLY_TEST_CLICKHOUSE_URL`.
pub fn clickhouse_url() -> String {
    std::env::var("TALLY_TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

/// The Kafka of the local stack, overridable with `TALLY_TEST_KAFKA_BROKERS`.
pub fn kafka_brokers() -> String {
    std::env::var("TALLY_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The value of the unlabelled counter or gauge `name` in a Prometheus text exposition (0 when
/// absent), as a service's `/metrics` answers it.
pub fn metric_value(exposition: &str, name: &str) -> u64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .map_or(0, |value| value as u64)
}

/// A random name with a prefix, for databases and topics (`tally_t_<prefix>_<12 hex>`).
pub fn unique_name(prefix: &str) -> String {
    format!("tally_t_{prefix}_{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff)
}

/// Config for a new database that does not exist yet.
pub fn new_database_config(prefix: &str) -> ChConfig {
    ChConfig {
        url: clickhouse_url(),
        database: unique_name(prefix),
        user: "default".into(),
        password: String::new(),
        cluster: None,
    }
}

/// A new database with every migration applied.
pub async fn migrated_database(prefix: &str) -> ChConfig {
    let config = new_database_config(prefix);
    tally_common::migrate::migrate(&config).await.expect("migrations apply on the local ClickHouse");
    config
}

pub async fn drop_database(config: &ChConfig) {
    let admin = tally_schemas::migrations::admin_database(&config.database);
    for database in [config.database.as_str(), admin.as_str()] {
        let _ = config.client().query(&format!("DROP DATABASE IF EXISTS {database}")).execute().await;
    }
}

/// Creates a topic on the local Kafka (waits until it exists).
pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_on(&kafka_brokers(), name, partitions).await;
}

/// Creates a topic on the given brokers.
pub async fn create_topic_on(brokers: &str, name: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("kafka admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        if let Err((topic, code)) = result {
            assert_eq!(code, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists, "creating topic {topic}");
        }
    }
}

pub async fn delete_topics(names: &[&str]) {
    delete_topics_on(&kafka_brokers(), names).await;
}

pub async fn delete_topics_on(brokers: &str, names: &[&str]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("kafka admin client");
    let _ = admin.delete_topics(names, &AdminOptions::new()).await;
}

/// Inserts an org and an active key for it straight into the admin tables; returns the key.
pub async fn create_org_with_key(
    config: &ChConfig,
    org_id: &str,
    plan: &str,
    events_per_minute: u32,
) -> String {
    let key = tally_schemas::keys::generate();
    config
        .client()
        .query(&format!(
            "INSERT INTO {} (org_id, name, plan, rate_limit_per_min, rate_limit_burst, created_at, deleted, version) VALUES (?, ?, ?, ?, 0, now(), 0, 1)",
            config.table("orgs")
        ))
        .bind(org_id)
        .bind(org_id)
        .bind(plan)
        .bind(events_per_minute)
        .execute()
        .await
        .expect("insert org");
    config
        .client()
        .query(&format!(
            "INSERT INTO {} (key_hash, key_prefix, org_id, name, created_at, revoked, version) VALUES (?, ?, ?, 'test', now(), 0, 1)",
            config.table("api_keys")
        ))
        .bind(&key.hash)
        .bind(&key.display_prefix)
        .bind(org_id)
        .execute()
        .await
        .expect("insert key");
    key.secret
}

/// A private single-node Kafka broker for tests that stop and restart the broker (the shared one
/// serves every other test). Uses the jars `dev/stack.sh` installed (`TALLY_KAFKA_LIBS`, exported
/// by `make test`), a temporary data directory and two free ports.
pub struct KafkaBroker {
    pub port: u16,
    libs: String,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

/// Asks `dev/stack.sh` where the Kafka jars are (installing them if missing).
fn kafka_libs_from_stack() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../dev/stack.sh");
    let output =
        std::process::Command::new("bash").args([script, "kafka-libs"]).output().expect("bash dev/stack.sh");
    assert!(output.status.success(), "dev/stack.sh kafka-libs failed");
    String::from_utf8_lossy(&output.stdout).lines().last().unwrap_or_default().trim().to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl KafkaBroker {
    /// Formats storage and starts the broker; returns once it accepts connections.
    pub async fn start() -> KafkaBroker {
        let libs = std::env::var("TALLY_KAFKA_LIBS").unwrap_or_else(|_| kafka_libs_from_stack());
        let dir = std::env::temp_dir().join(unique_name("kafka"));
        std::fs::create_dir_all(dir.join("data")).expect("broker data dir");
        let (port, controller) = (free_port(), free_port());
        let properties = format!(
            "process.roles=broker,controller\nnode.id=1\ncontroller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\ncontroller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\nlistener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
             log.dirs={}\nnum.partitions=2\noffsets.topic.replication.factor=1\noffsets.topic.num.partitions=2\n\
             transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\ngroup.initial.rebalance.delay.ms=0\n\
             auto.create.topics.enable=false\n",
            dir.join("data").display()
        );
        std::fs::write(dir.join("server.properties"), properties).expect("broker config");
        let classpath = format!("{libs}/*");
        let formatted = std::process::Command::new("java")
            .args([
                "-cp",
                &classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                "TALLYtestClusterIdAAAA",
                "-c",
            ])
            .arg(dir.join("server.properties"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("java");
        assert!(formatted.success(), "kafka storage format failed");
        let mut broker = KafkaBroker { port, libs, dir, child: None };
        broker.resume().await;
        broker
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the (stopped) broker again on the same data and ports.
    pub async fn resume(&mut self) {
        let child = std::process::Command::new("java")
            .args([
                "-Xms128m",
                "-Xmx384m",
                "-XX:+UseSerialGC",
                "-cp",
                &format!("{}/*", self.libs),
                "kafka.Kafka",
            ])
            .arg(self.dir.join("server.properties"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("java");
        self.child = Some(child);
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("test broker did not start on port {}", self.port);
    }

    /// Kills the broker at once (as a crash would).
    pub fn kill(&mut self) {
        kill_now(&mut self.child);
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills a test server process at once (as a crash would) and reaps it.
fn kill_now(child: &mut Option<std::process::Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A private ClickHouse server for tests that stop and restart it (the shared one serves every
/// other test): the local stack's config template on free ports and a temporary data directory.
pub struct ClickHouseServer {
    pub url: String,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl ClickHouseServer {
    pub async fn start() -> ClickHouseServer {
        let dir = std::env::temp_dir().join(unique_name("clickhouse"));
        let data = dir.join("data");
        for sub in ["tmp", "user_files", "format_schemas"] {
            std::fs::create_dir_all(data.join(sub)).expect("clickhouse data dir");
        }
        let template = concat!(env!("CARGO_MANIFEST_DIR"), "/../dev/clickhouse/");
        let (http, native) = (free_port(), free_port());
        let config = std::fs::read_to_string(format!("{template}config.xml"))
            .expect("dev/clickhouse/config.xml")
            .replace("@DATA@", &data.display().to_string())
            .replace("@LOG@", &dir.display().to_string())
            .replace("<http_port>8123</http_port>", &format!("<http_port>{http}</http_port>"))
            .replace("<tcp_port>9000</tcp_port>", &format!("<tcp_port>{native}</tcp_port>"));
        std::fs::write(dir.join("config.xml"), config).expect("clickhouse config");
        std::fs::copy(format!("{template}users.xml"), dir.join("users.xml")).expect("clickhouse users");
        let mut server = ClickHouseServer { url: format!("http://127.0.0.1:{http}"), dir, child: None };
        server.resume().await;
        server
    }

    /// Starts the (stopped) server again on the same data and ports; returns once it answers.
    pub async fn resume(&mut self) {
        let binary = ["/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists())
            .unwrap_or("clickhouse-server");
        let child = std::process::Command::new(binary)
            .arg(format!("--config-file={}", self.dir.join("config.xml").display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("clickhouse-server");
        self.child = Some(child);
        let client = ping_probe(&self.url);
        for _ in 0..300 {
            if client().await {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("test clickhouse did not start at {}", self.url);
    }

    /// Kills the server at once (as a crash or an outage would).
    pub fn kill(&mut self) {
        kill_now(&mut self.child);
    }

    /// The directory of `table`'s parts (while the server is down, a test may damage them).
    pub fn table_dir(&self, database: &str, table: &str) -> std::path::PathBuf {
        self.dir.join("data").join("data").join(database).join(table)
    }

    /// Config for a new database on this server, with every migration applied.
    pub async fn migrated_database(&self, prefix: &str) -> ChConfig {
        let config = ChConfig { url: self.url.clone(), ..new_database_config(prefix) };
        tally_common::migrate::migrate(&config).await.expect("migrations apply on the test clickhouse");
        config
    }
}

/// A `SELECT 1` against `url` through the `clickhouse` client, as a reusable probe.
fn ping_probe(url: &str) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> {
    let client = ChConfig {
        url: url.to_owned(),
        database: "default".into(),
        user: "default".into(),
        password: String::new(),
        cluster: None,
    }
    .client();
    move || {
        let client = client.clone();
        Box::pin(async move { tally_common::ch::ping(&client).await })
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The local stack's S3 server (S3Proxy) and its development credentials.
pub const S3_ACCESS_KEY: &str = "tally";
pub const S3_SECRET_KEY: &str = "tally-dev-secret";

pub fn s3_endpoint() -> String {
    std::env::var("TALLY_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9100".into())
}

/// A SigV4-signed request on a bucket (or `bucket/key`) of the local S3 server, with curl
/// (object_store has no bucket operations): `PUT` creates, `DELETE` deletes. The HTTP status.
pub fn s3_bucket(method: &str, name: &str) -> u16 {
    let output = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "--aws-sigv4", "aws:amz:us-east-1:s3"])
        .args(["--user", &format!("{S3_ACCESS_KEY}:{S3_SECRET_KEY}"), &format!("{}/{name}", s3_endpoint())])
        .output();
    output.map_or(0, |o| String::from_utf8_lossy(&o.stdout).parse().unwrap_or(0))
}
