//! The query API's configuration, from `TALLY_*` settings, validated at start.

use std::time::Duration;

use tally_archiver::config::ArchiverConfig;
use tally_common::config::{CommonConfig, ConfigError, Env};

#[derive(Debug, Clone)]
pub struct QueryConfig {
    pub common: CommonConfig,
    /// Bearer token of the admin surface (`/admin/*`). Required; at least 16 characters.
    pub admin_token: String,
    pub key_refresh_interval: Duration,
    /// Apply the ClickHouse migrations at start (safe with several replicas).
    pub migrate: bool,
    /// Where the archiver writes (`TALLY_ARCHIVE_URL` and its S3 settings, the same as the
    /// archiver's): raw rows of dropped months are read from there. None when not set.
    pub archive: Option<ArchiverConfig>,
    /// `TALLY_QUERY_ARCHIVE_CACHE_S`: how long the list of dropped months is kept (below the
    /// archiver's `TALLY_ARCHIVE_DROP_GRACE_S`).
    pub archive_cache: Duration,
    /// `TALLY_QUERY_ARCHIVE_MAX_ROWS`: most archived rows one analytics request loads.
    pub archive_max_rows: usize,
    /// The live totals of `/api/telemetry/stream`.
    pub stream: crate::stream::StreamConfig,
}

impl QueryConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let admin_token = env.required("TALLY_ADMIN_TOKEN")?;
        if admin_token.len() < 16 {
            return Err(ConfigError::Invalid {
                key: "TALLY_ADMIN_TOKEN".into(),
                value: "(hidden)".into(),
                reason: "must be at least 16 characters".into(),
            });
        }
        Ok(QueryConfig {
            common: CommonConfig::from_env(env, "127.0.0.1:8081")?,
            admin_token,
            key_refresh_interval: env.millis("TALLY_KEY_REFRESH_MS", 5_000)?,
            migrate: env.parse("TALLY_MIGRATE", true)?,
            archive: match env.optional("TALLY_ARCHIVE_URL") {
                Some(_) => Some(ArchiverConfig::from_env(env)?),
                None => None,
            },
            archive_cache: Duration::from_secs(env.parse("TALLY_QUERY_ARCHIVE_CACHE_S", 30)?),
            archive_max_rows: env.parse("TALLY_QUERY_ARCHIVE_MAX_ROWS", 2_000_000)?,
            stream: crate::stream::StreamConfig {
                interval: env.millis("TALLY_QUERY_STREAM_INTERVAL_MS", 1_000)?,
                per_org: env.parse("TALLY_QUERY_STREAMS_PER_ORG", 16)?,
                total: env.parse("TALLY_QUERY_STREAMS_TOTAL", 2_048)?,
            },
        })
    }
}
