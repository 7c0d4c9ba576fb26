//! Why an archiver step failed; each says what to do.

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("archive store, object {key}: {source} (check the URL, the bucket and its permissions)")]
    Store { key: String, source: object_store::Error },
    #[error("local spool file: {0}")]
    Spool(std::io::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("manifest {key}: {reason}")]
    Manifest { key: String, reason: String },
    #[error("month {month}: {reason}")]
    Mismatch { month: String, reason: String },
    #[error("month {0} is being archived by another archiver (lock table {1}); try again later")]
    Locked(String, String),
}
