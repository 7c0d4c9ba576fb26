//! Typed configuration from an environment map. Binaries pass the process environment once at
//! start; tests pass their own map. Nothing else reads the environment.

use std::collections::HashMap;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key} is required")]
    Missing { key: String },
    #[error("{key}={value:?} is invalid: {reason}")]
    Invalid { key: String, value: String, reason: String },
}

/// An immutable view of `TALLY_*` settings.
#[derive(Debug, Clone, Default)]
pub struct Env {
    values: HashMap<String, String>,
}

impl Env {
    /// The process environment; call once, in `main`. A secret may come from a file instead
    /// (Kubernetes mounts Secrets as files; an environment variable shows in `/proc/<pid>/environ`
    /// and in crash reports): `TALLY_X_FILE=/path` sets `TALLY_X` to the file's content, its
    /// trailing newline removed. Giving both, or a file that cannot be read, is an error.
    pub fn from_process() -> Result<Self, ConfigError> {
        Env::resolving_files(std::env::vars().filter(|(k, _)| k.starts_with("TALLY_")), |path| {
            std::fs::read_to_string(path)
        })
    }

    fn resolving_files(
        vars: impl IntoIterator<Item = (String, String)>,
        read: impl Fn(&str) -> std::io::Result<String>,
    ) -> Result<Self, ConfigError> {
        let mut values = HashMap::new();
        let mut files = Vec::new();
        for (key, value) in vars {
            match key.strip_suffix("_FILE") {
                Some(base) => files.push((base.to_owned(), key, value)),
                None => {
                    values.insert(key, value);
                }
            }
        }
        for (base, key, path) in files {
            if values.contains_key(&base) {
                return Err(ConfigError::Invalid {
                    key,
                    value: path,
                    reason: format!("{base} is set too: give one of them"),
                });
            }
            let content = read(&path).map_err(|e| ConfigError::Invalid {
                key: key.clone(),
                value: path.clone(),
                reason: format!("cannot read the file: {e}"),
            })?;
            values.insert(base, content.trim_end_matches(['\n', '\r']).to_owned());
        }
        Ok(Env { values })
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Env { values: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }

    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.values.insert(key.into(), value.into());
        self
    }

    pub fn string(&self, key: &str, default: &str) -> String {
        self.values.get(key).cloned().unwrap_or_else(|| default.to_owned())
    }

    pub fn optional(&self, key: &str) -> Option<String> {
        self.values.get(key).filter(|v| !v.is_empty()).cloned()
    }

    pub fn required(&self, key: &str) -> Result<String, ConfigError> {
        self.optional(key).ok_or_else(|| ConfigError::Missing { key: key.to_owned() })
    }

    pub fn parse<T>(&self, key: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match self.values.get(key) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|e: T::Err| ConfigError::Invalid {
                key: key.to_owned(),
                value: value.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// A number that must lie within `range`; `what` says what it counts, for the error.
    pub fn parse_within<T>(
        &self,
        key: &str,
        default: T,
        range: std::ops::RangeInclusive<T>,
        what: &str,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + std::fmt::Display,
        T::Err: std::fmt::Display,
    {
        let value = self.parse(key, default)?;
        if range.contains(&value) {
            return Ok(value);
        }
        Err(ConfigError::Invalid {
            key: key.to_owned(),
            value: value.to_string(),
            reason: format!("must be {}..={} ({what})", range.start(), range.end()),
        })
    }

    /// A duration given in milliseconds.
    pub fn millis(&self, key: &str, default_ms: u64) -> Result<std::time::Duration, ConfigError> {
        Ok(std::time::Duration::from_millis(self.parse(key, default_ms)?))
    }
}

/// Where ClickHouse is: `TALLY_CLICKHOUSE_URL`, `_DATABASE` (a plain identifier: it is spliced into
/// SQL), `_USER`, `_PASSWORD`. (Here rather than in `ch`, so `ch` needs nothing of `config`.)
impl crate::ch::ChConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let database = env.string("TALLY_CLICKHOUSE_DATABASE", "tally");
        if !tally_schemas::migrations::is_valid_database_name(&database) {
            return Err(ConfigError::Invalid {
                key: "TALLY_CLICKHOUSE_DATABASE".into(),
                value: database,
                reason: "must be letters, digits and underscores, not starting with a digit".into(),
            });
        }
        Ok(crate::ch::ChConfig {
            url: env.string("TALLY_CLICKHOUSE_URL", "http://127.0.0.1:8123"),
            database,
            user: env.string("TALLY_CLICKHOUSE_USER", "default"),
            password: env.string("TALLY_CLICKHOUSE_PASSWORD", ""),
            cluster: cluster_from_env(env)?,
        })
    }
}

/// `TALLY_CLICKHOUSE_CLUSTER`, `_SHARDS`, `_INSERT_QUORUM` (see `ch::Cluster`).
fn cluster_from_env(env: &Env) -> Result<Option<crate::ch::Cluster>, ConfigError> {
    let Some(name) = env.optional("TALLY_CLICKHOUSE_CLUSTER") else {
        if env.optional("TALLY_CLICKHOUSE_SHARDS").is_some() {
            return Err(ConfigError::Missing {
                key: "TALLY_CLICKHOUSE_CLUSTER (set with TALLY_CLICKHOUSE_SHARDS)".into(),
            });
        }
        return Ok(None);
    };
    let invalid =
        |key: &str, value: String, reason: String| ConfigError::Invalid { key: key.into(), value, reason };
    if !tally_schemas::migrations::is_valid_database_name(&name) {
        return Err(invalid(
            "TALLY_CLICKHOUSE_CLUSTER",
            name,
            "must be a plain identifier (it is spliced into ON CLUSTER)".into(),
        ));
    }
    let shards = match env.optional("TALLY_CLICKHOUSE_SHARDS") {
        None => Vec::new(),
        Some(text) => crate::ch::Cluster::parse_shards(&text)
            .map_err(|e| invalid("TALLY_CLICKHOUSE_SHARDS", text, e))?,
    };
    let replicas = shards.iter().map(Vec::len).min().unwrap_or(1);
    let insert_quorum: usize = env.parse("TALLY_CLICKHOUSE_INSERT_QUORUM", replicas)?;
    if insert_quorum == 0 || insert_quorum > replicas {
        return Err(invalid(
            "TALLY_CLICKHOUSE_INSERT_QUORUM",
            insert_quorum.to_string(),
            format!("must be 1..={replicas} (the replicas of the smallest shard)"),
        ));
    }
    Ok(Some(crate::ch::Cluster { name, shards, insert_quorum }))
}

/// Settings every service shares.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub listen_addr: std::net::SocketAddr,
    pub clickhouse: crate::ch::ChConfig,
    pub log_format: crate::telemetry::LogFormat,
    /// How long graceful shutdown may take before the process exits anyway.
    pub shutdown_timeout: std::time::Duration,
    pub kafka_security: KafkaSecurity,
}

/// How every Kafka client of a service authenticates: `TALLY_KAFKA_SECURITY_PROTOCOL`
/// (`plaintext`, the default; `ssl`, `sasl_plaintext`, `sasl_ssl`), `TALLY_KAFKA_SASL_MECHANISM`
/// (`SCRAM-SHA-512` by default when SASL is on), `TALLY_KAFKA_SASL_USERNAME`,
/// `TALLY_KAFKA_SASL_PASSWORD`, `TALLY_KAFKA_SSL_CA_LOCATION` (a PEM file: the brokers' CA, e.g.
/// Strimzi's cluster CA). The password is never logged (`Debug` hides it).
#[derive(Clone, Default)]
pub struct KafkaSecurity {
    pub protocol: String,
    pub sasl: Option<(String, String, String)>,
    pub ca_location: Option<String>,
    /// librdkafka's `debug` contexts (`TALLY_KAFKA_DEBUG`, e.g. `cgrp,fetch`): its own trace of
    /// what a client does, logged at debug level (`TALLY_LOG=info,librdkafka=debug,rdkafka=debug`).
    pub debug: Option<String>,
}

impl std::fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSecurity")
            .field("protocol", &self.protocol)
            .field("sasl", &self.sasl.as_ref().map(|(mechanism, user, _)| (mechanism, user, "<hidden>")))
            .field("ca_location", &self.ca_location)
            .field("debug", &self.debug)
            .finish()
    }
}

impl KafkaSecurity {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let invalid = |key: &str, value: String, reason: &str| ConfigError::Invalid {
            key: key.into(),
            value,
            reason: reason.into(),
        };
        let protocol = env.string("TALLY_KAFKA_SECURITY_PROTOCOL", "plaintext").to_ascii_lowercase();
        if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&protocol.as_str()) {
            return Err(invalid(
                "TALLY_KAFKA_SECURITY_PROTOCOL",
                protocol,
                "expected plaintext, ssl, sasl_plaintext or sasl_ssl",
            ));
        }
        let sasl = if protocol.starts_with("sasl") {
            let mechanism = env.string("TALLY_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512");
            if !["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"].contains(&mechanism.as_str()) {
                return Err(invalid(
                    "TALLY_KAFKA_SASL_MECHANISM",
                    mechanism,
                    "expected SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN",
                ));
            }
            let user = env.optional("TALLY_KAFKA_SASL_USERNAME").ok_or_else(|| {
                invalid("TALLY_KAFKA_SASL_USERNAME", String::new(), "required with a sasl_* protocol")
            })?;
            let password = env.optional("TALLY_KAFKA_SASL_PASSWORD").ok_or_else(|| {
                invalid("TALLY_KAFKA_SASL_PASSWORD", "<unset>".into(), "required with a sasl_* protocol")
            })?;
            Some((mechanism, user, password))
        } else {
            None
        };
        Ok(KafkaSecurity {
            protocol,
            sasl,
            ca_location: env.optional("TALLY_KAFKA_SSL_CA_LOCATION"),
            debug: env.optional("TALLY_KAFKA_DEBUG"),
        })
    }

    /// Sets what every Kafka client of Tally shares on `client`: the security properties (nothing
    /// for plaintext), and reconnection to a restarted broker at most 1 s apart (librdkafka's
    /// default backs off to 10 s, which `make chaos` measured as the broker-restart recovery).
    pub fn apply<'c>(&self, client: &'c mut rdkafka::ClientConfig) -> &'c mut rdkafka::ClientConfig {
        client.set("reconnect.backoff.max.ms", "1000");
        if self.protocol != "plaintext" && !self.protocol.is_empty() {
            client.set("security.protocol", &self.protocol);
        }
        if let Some((mechanism, user, password)) = &self.sasl {
            client.set("sasl.mechanism", mechanism).set("sasl.username", user).set("sasl.password", password);
        }
        if let Some(ca) = &self.ca_location {
            client.set("ssl.ca.location", ca);
        }
        if let Some(contexts) = &self.debug {
            client.set("debug", contexts);
        }
        client
    }
}

impl CommonConfig {
    pub fn from_env(env: &Env, default_addr: &str) -> Result<Self, ConfigError> {
        Ok(CommonConfig {
            listen_addr: env
                .parse("TALLY_LISTEN_ADDR", default_addr.parse().expect("default address parses"))?,
            clickhouse: crate::ch::ChConfig::from_env(env)?,
            log_format: env.parse("TALLY_LOG_FORMAT", crate::telemetry::LogFormat::Text)?,
            shutdown_timeout: env.millis("TALLY_SHUTDOWN_TIMEOUT_MS", 30_000)?,
            kafka_security: KafkaSecurity::from_env(env)?,
        })
    }
}

#[cfg(test)]
mod kafka_security_tests {
    use super::*;

    fn properties(pairs: &[(&str, &str)]) -> Result<Vec<(String, String)>, ConfigError> {
        let security = KafkaSecurity::from_env(&Env::from_pairs(pairs.iter().copied()))?;
        let mut client = rdkafka::ClientConfig::new();
        security.apply(&mut client);
        let mut set: Vec<(String, String)> =
            client.config_map().iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        set.sort();
        Ok(set)
    }

    #[test]
    fn plaintext_sets_nothing_and_sasl_needs_its_credentials() {
        let plain = properties(&[]).unwrap();
        assert_eq!(
            plain,
            vec![("reconnect.backoff.max.ms".to_owned(), "1000".to_owned())],
            "no security property"
        );
        assert!(properties(&[("TALLY_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")]).is_err(), "no user");
        assert!(properties(&[("TALLY_KAFKA_SECURITY_PROTOCOL", "kerberos")]).is_err());
        let set = properties(&[
            ("TALLY_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("TALLY_KAFKA_SASL_USERNAME", "tally-ingest"),
            ("TALLY_KAFKA_SASL_PASSWORD", "s3cret"),
            ("TALLY_KAFKA_SSL_CA_LOCATION", "/etc/kafka-ca/ca.crt"),
        ])
        .unwrap();
        let get = |k: &str| set.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(get("sasl.username"), Some("tally-ingest"));
        assert_eq!(get("sasl.password"), Some("[sanitized for safety]"), "rdkafka hides it from its own map");
        assert_eq!(get("ssl.ca.location"), Some("/etc/kafka-ca/ca.crt"));
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let env = Env::from_pairs([
            ("TALLY_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
            ("TALLY_KAFKA_SASL_USERNAME", "u"),
            ("TALLY_KAFKA_SASL_PASSWORD", "hunter2-secret"),
        ]);
        let text = format!("{:?}", KafkaSecurity::from_env(&env).unwrap());
        assert!(!text.contains("hunter2-secret") && text.contains("<hidden>"), "{text}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_secret_comes_from_its_file_without_the_trailing_newline() {
        let files = |path: &str| match path {
            "/run/secrets/ch" => Ok("s3cr3t\n".to_owned()),
            _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")),
        };
        let var = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let env = Env::resolving_files(
            [var("TALLY_CLICKHOUSE_PASSWORD_FILE", "/run/secrets/ch"), var("TALLY_CLICKHOUSE_USER", "tally")],
            files,
        )
        .unwrap();
        assert_eq!(env.optional("TALLY_CLICKHOUSE_PASSWORD").as_deref(), Some("s3cr3t"));
        assert_eq!(env.optional("TALLY_CLICKHOUSE_PASSWORD_FILE"), None);
        assert_eq!(env.optional("TALLY_CLICKHOUSE_USER").as_deref(), Some("tally"));

        let both = Env::resolving_files(
            [var("TALLY_ADMIN_TOKEN", "t"), var("TALLY_ADMIN_TOKEN_FILE", "/run/secrets/ch")],
            files,
        );
        assert!(matches!(both, Err(ConfigError::Invalid { ref key, .. }) if key == "TALLY_ADMIN_TOKEN_FILE"));
        let missing = Env::resolving_files([var("TALLY_ADMIN_TOKEN_FILE", "/nope")], files).unwrap_err();
        assert!(missing.to_string().contains("cannot read the file"), "{missing}");
    }

    use super::*;
    use crate::ch::{ChConfig, Cluster};

    #[test]
    fn one_server_unless_a_cluster_is_named() {
        let config = ChConfig::from_env(&Env::default()).expect("defaults");
        assert_eq!(config.cluster, None);
        assert_eq!(config.read_table("events"), "tally.events");
        assert!(ChConfig::from_env(&Env::from_pairs([("TALLY_CLICKHOUSE_SHARDS", "http://a:1")])).is_err());
    }

    #[test]
    fn a_cluster_reads_the_distributed_tables_and_quorums_every_replica_by_default() {
        let env = Env::from_pairs([
            ("TALLY_CLICKHOUSE_CLUSTER", "tally"),
            ("TALLY_CLICKHOUSE_SHARDS", "http://a:8123, http://b:8123;http://c:8123,http://d:8123"),
        ]);
        let config = ChConfig::from_env(&env).expect("cluster");
        let cluster = config.cluster.clone().expect("cluster set");
        assert_eq!(cluster.shards, [["http://a:8123", "http://b:8123"], ["http://c:8123", "http://d:8123"]]);
        assert_eq!(cluster.insert_quorum, 2);
        assert_eq!(config.read_table("events"), "tally.events_all");
        assert_eq!(config.read_table("rollup_hourly"), "tally.rollup_hourly_all");
        assert_eq!(config.read_table("orgs"), "tally_admin.orgs", "admin tables are replicated everywhere");
        assert_eq!(config.table("events"), "tally.events", "writes name the local table");
    }

    #[test]
    fn cluster_settings_are_checked() {
        let with = |pairs: &[(&str, &str)]| {
            let mut env = Env::from_pairs([("TALLY_CLICKHOUSE_CLUSTER", "tally")]);
            for (k, v) in pairs {
                env = env.with(*k, *v);
            }
            ChConfig::from_env(&env)
        };
        assert!(with(&[("TALLY_CLICKHOUSE_SHARDS", "a:8123")]).is_err(), "not a URL");
        assert!(with(&[("TALLY_CLICKHOUSE_SHARDS", " ; ")]).is_err(), "no shard");
        let shards = ("TALLY_CLICKHOUSE_SHARDS", "http://a:1,http://b:1;http://c:1");
        assert!(
            with(&[shards, ("TALLY_CLICKHOUSE_INSERT_QUORUM", "2")]).is_err(),
            "above the smallest shard"
        );
        assert!(with(&[shards, ("TALLY_CLICKHOUSE_INSERT_QUORUM", "0")]).is_err());
        assert_eq!(with(&[shards]).unwrap().cluster.unwrap().insert_quorum, 1);
        assert!(ChConfig::from_env(&Env::from_pairs([("TALLY_CLICKHOUSE_CLUSTER", "x; DROP")])).is_err());
        let _ = Cluster::parse_shards("http://a:1").unwrap();
    }

    #[test]
    fn a_bounded_number_says_its_range_and_what_it_counts() {
        let read = |pairs: &[(&str, &str)]| {
            Env::from_pairs(pairs.iter().copied()).parse_within("TALLY_N", 5u32, 1..=10, "things")
        };
        assert_eq!(read(&[]).unwrap(), 5);
        assert_eq!(read(&[("TALLY_N", "10")]).unwrap(), 10);
        let over = read(&[("TALLY_N", "11")]).unwrap_err().to_string();
        assert_eq!(over, "TALLY_N=\"11\" is invalid: must be 1..=10 (things)");
        assert!(read(&[("TALLY_N", "0")]).is_err());
        assert!(read(&[("TALLY_N", "ten")])
            .unwrap_err()
            .to_string()
            .starts_with("TALLY_N=\"ten\" is invalid"));
    }
}
