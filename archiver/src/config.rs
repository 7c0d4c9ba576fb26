//! The archiver's configuration, from `TALLY_*` settings, validated at start.

use std::time::Duration;

use tally_common::config::{CommonConfig, ConfigError, Env};

#[derive(Debug, Clone)]
pub struct ArchiverConfig {
    pub common: CommonConfig,
    /// `TALLY_ARCHIVE_URL`: `file:///path` (the default, `.dev/archive` under `make up`) or
    /// `s3://bucket[/prefix]` with `TALLY_S3_ENDPOINT`, `TALLY_S3_REGION` and the credentials in
    /// `TALLY_S3_ACCESS_KEY_ID`/`TALLY_S3_SECRET_ACCESS_KEY` (or their `_FILE`s), else wherever
    /// the AWS SDKs look (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, a web identity token, the
    /// instance's role).
    pub archive_url: String,
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    /// The access key id and the secret key, when given as settings (`Debug` hides the secret).
    pub s3_credentials: Option<S3Credentials>,
    /// Added to the ingest's maximum event age before a month counts as closed (consumer lag).
    pub lag_margin: chrono::Duration,
    /// Months kept in ClickHouse before the current one; older archived months are dropped.
    /// None = never drop (the default).
    pub hot_months: Option<u32>,
    /// Estimated encoded bytes of a row group before it is written out (bounds memory; smaller
    /// groups let a per-org read skip more, larger ones compress better).
    pub row_group_bytes: usize,
    /// Rows of one Parquet file (bounds the local spool file and a reader's unit of work).
    pub file_rows: u64,
    /// Rows one ClickHouse query streams (bounds ClickHouse's sort of a chunk).
    pub chunk_rows: u64,
    /// `serve`: time between runs.
    pub interval: Duration,
    /// A month's lock without a heartbeat for this long belongs to a stopped archiver and is
    /// taken over.
    pub lock_stale_after: Duration,
    /// How long one S3 request is retried (transient errors) before the pass fails.
    pub s3_retry_timeout: Duration,
    /// `TALLY_ARCHIVE_DROP_GRACE_S`: between publishing a month's drop record and dropping its
    /// partition, so every query API has seen the record (they cache it for
    /// `TALLY_QUERY_ARCHIVE_CACHE_S`, 30 s by default) before the rows leave ClickHouse.
    pub drop_grace: Duration,
    /// `TALLY_KAFKA_BROKERS` and `TALLY_DLQ_TOPIC`: the dead-letter topic archived per day.
    pub kafka_brokers: String,
    pub dlq_topic: String,
    /// `TALLY_ARCHIVE_DLQ_DAYS`: closed days looked at, counting back from yesterday (0 = the
    /// dead letters are not archived). Keep it within the topic's retention.
    pub dlq_days: u32,
    /// `TALLY_ARCHIVE_DLQ_MARGIN_MINUTES`: a day is archived this long after it ends.
    pub dlq_margin: chrono::Duration,
}

impl ArchiverConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let hot: i64 = env.parse("TALLY_ARCHIVE_HOT_MONTHS", -1)?;
        let invalid = |key: &str, value: String, reason: &str| ConfigError::Invalid {
            key: key.into(),
            value,
            reason: reason.into(),
        };
        let archive_url = env.string("TALLY_ARCHIVE_URL", "file://.dev/archive");
        if !archive_url.starts_with("file://") && !archive_url.starts_with("s3://") {
            return Err(invalid("TALLY_ARCHIVE_URL", archive_url, "expected file:///path or s3://bucket"));
        }
        let common = CommonConfig::from_env(env, "127.0.0.1:8083")?;
        if let Some(cluster) = &common.clickhouse.cluster {
            // It reads every shard's parts and drops a month on every shard: it must know them.
            if cluster.shards.is_empty() {
                return Err(ConfigError::Missing {
                    key: "TALLY_CLICKHOUSE_SHARDS (the archiver on a cluster reads and drops each shard's partitions)"
                        .into(),
                });
            }
        }
        let config = ArchiverConfig {
            common,
            archive_url,
            s3_endpoint: env.optional("TALLY_S3_ENDPOINT"),
            s3_region: env.string("TALLY_S3_REGION", "us-east-1"),
            s3_credentials: S3Credentials::from_env(env)?,
            lag_margin: chrono::Duration::hours(env.parse("TALLY_ARCHIVE_LAG_MARGIN_HOURS", 24)?),
            hot_months: u32::try_from(hot).ok(),
            row_group_bytes: env.parse("TALLY_ARCHIVE_ROW_GROUP_BYTES", 16 << 20)?,
            file_rows: env.parse("TALLY_ARCHIVE_FILE_ROWS", 10_000_000)?,
            chunk_rows: env.parse("TALLY_ARCHIVE_CHUNK_ROWS", 2_000_000)?,
            interval: Duration::from_secs(env.parse("TALLY_ARCHIVE_INTERVAL_S", 3600)?),
            lock_stale_after: Duration::from_secs(env.parse("TALLY_ARCHIVE_LOCK_STALE_S", 120)?),
            s3_retry_timeout: Duration::from_secs(env.parse("TALLY_ARCHIVE_S3_RETRY_TIMEOUT_S", 180)?),
            drop_grace: Duration::from_secs(env.parse("TALLY_ARCHIVE_DROP_GRACE_S", 60)?),
            kafka_brokers: env.string("TALLY_KAFKA_BROKERS", "127.0.0.1:9092"),
            dlq_topic: env.string("TALLY_DLQ_TOPIC", tally_schemas::record::DLQ_TOPIC),
            dlq_days: env.parse("TALLY_ARCHIVE_DLQ_DAYS", 7)?,
            dlq_margin: chrono::Duration::minutes(env.parse("TALLY_ARCHIVE_DLQ_MARGIN_MINUTES", 60)?),
        };
        if config.lag_margin < chrono::Duration::zero() {
            return Err(invalid(
                "TALLY_ARCHIVE_LAG_MARGIN_HOURS",
                config.lag_margin.to_string(),
                "must be >= 0",
            ));
        }
        if config.file_rows == 0 || config.chunk_rows == 0 || config.row_group_bytes < 1 << 20 {
            return Err(invalid(
                "TALLY_ARCHIVE_FILE_ROWS/CHUNK_ROWS/ROW_GROUP_BYTES",
                format!("{}/{}/{}", config.file_rows, config.chunk_rows, config.row_group_bytes),
                "rows must be > 0 and row groups at least 1 MiB",
            ));
        }
        Ok(config)
    }
}

/// S3 credentials given as settings.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<hidden>")
            .finish()
    }
}

impl S3Credentials {
    fn from_env(env: &Env) -> Result<Option<S3Credentials>, ConfigError> {
        match (env.optional("TALLY_S3_ACCESS_KEY_ID"), env.optional("TALLY_S3_SECRET_ACCESS_KEY")) {
            (None, None) => Ok(None),
            (Some(access_key_id), Some(secret_access_key)) => {
                Ok(Some(S3Credentials { access_key_id, secret_access_key }))
            }
            (Some(_), None) => Err(ConfigError::Missing { key: "TALLY_S3_SECRET_ACCESS_KEY".into() }),
            (None, Some(_)) => Err(ConfigError::Missing { key: "TALLY_S3_ACCESS_KEY_ID".into() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_credentials_come_in_pairs_and_no_secret_is_shown() {
        let env = |pairs: &[(&str, &str)]| Env::from_pairs(pairs.iter().copied());
        let config = ArchiverConfig::from_env(&env(&[
            ("TALLY_S3_ACCESS_KEY_ID", "AKIAEXAMPLE"),
            ("TALLY_S3_SECRET_ACCESS_KEY", "s3cr3t-key"),
            ("TALLY_CLICKHOUSE_PASSWORD", "ch-passw0rd"),
        ]))
        .unwrap();
        let shown = format!("{config:?}");
        assert!(shown.contains("AKIAEXAMPLE"), "{shown}");
        assert!(!shown.contains("s3cr3t-key") && !shown.contains("ch-passw0rd"), "{shown}");
        let half = ArchiverConfig::from_env(&env(&[("TALLY_S3_ACCESS_KEY_ID", "AKIAEXAMPLE")]));
        assert!(matches!(half, Err(ConfigError::Missing { ref key }) if key == "TALLY_S3_SECRET_ACCESS_KEY"));
        let other = ArchiverConfig::from_env(&env(&[("TALLY_S3_SECRET_ACCESS_KEY", "s3cr3t-key")]));
        assert!(matches!(other, Err(ConfigError::Missing { ref key }) if key == "TALLY_S3_ACCESS_KEY_ID"));
    }
}
