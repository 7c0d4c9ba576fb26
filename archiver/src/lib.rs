//! The archiver: closed months of `tally.events` to Parquet on a local directory or S3, checked
//! against ClickHouse before a manifest publishes them, and dropped from ClickHouse (retention)
//! only after that. `archive` runs a pass; `source` reads ClickHouse; `columns` and `writer` make
//! the Parquet files; `store` is the object store; `manifest` the commit point; `verify` reads
//! files back; `month` says when a month is closed; `late` finds rows an archived month lacks;
//! `read` reads one org's rows of a file by ranged requests; `dead_letters` archives the
//! dead-letter topic per day; `serve` runs passes periodically with the ops routes.

pub mod archive;
pub mod columns;
pub mod config;
pub mod dead_letters;
pub mod error;
pub mod late;
pub mod manifest;
pub mod month;
pub mod read;
pub mod rows;
pub mod serve;
pub mod source;
pub mod store;
pub mod totals;
pub mod verify;
pub mod writer;
