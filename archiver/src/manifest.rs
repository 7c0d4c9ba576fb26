//! The manifest of an archived month: the commit point. Written last, after every file it names
//! was uploaded and read back; readers trust only files a manifest names, and take a month's
//! highest version. `events/year=2026/month=10/manifest-v0001.json`.

use serde::{Deserialize, Serialize};

use crate::error::ArchiveError;
use crate::month::Month;
use crate::store::Archive;
use crate::totals::{OrgSums, Sums};

pub const FORMAT: &str = "tally-archive-manifest";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Key relative to the archive's root.
    pub path: String,
    pub bytes: u64,
    pub rows: u64,
    pub sha256: String,
    pub row_groups: usize,
}

/// Where the rows came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub database: String,
    pub table: String,
    /// `toYYYYMM(timestamp)` of the month.
    pub partition: u32,
    /// When ClickHouse's per-org sums were taken (RFC 3339), before the rows were read; the files
    /// hold exactly those rows.
    pub snapshot_at: String,
    /// Active parts of the partition at the snapshot.
    pub parts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub schema_version: u32,
    pub month: String,
    pub version: u32,
    pub created_at: String,
    pub source: Source,
    pub files: Vec<FileEntry>,
    pub orgs: OrgSums,
    pub totals: Sums,
    /// How the files were checked before this manifest was written.
    pub verified: String,
}

pub fn key(month: Month, version: u32) -> String {
    format!("{}manifest-v{version:04}.json", month.prefix())
}

/// The version of a manifest's key (`…/manifest-v0003.json` → 3); None for other keys.
pub fn version_of(key: &str) -> Option<u32> {
    key.rsplit('/').next()?.strip_prefix("manifest-v")?.strip_suffix(".json")?.parse().ok()
}

pub fn file_key(month: Month, version: u32, part: usize) -> String {
    format!("{}v{version:04}-part-{part:05}.parquet", month.prefix())
}

impl Manifest {
    /// The latest manifest of `month`, if it was ever archived.
    pub async fn latest(archive: &Archive, month: Month) -> Result<Option<Manifest>, ArchiveError> {
        let mut versions: Vec<u32> =
            archive.list(&month.prefix()).await?.iter().filter_map(|(key, _)| version_of(key)).collect();
        versions.sort_unstable();
        let Some(version) = versions.last() else { return Ok(None) };
        Manifest::read(archive, month, *version).await.map(Some)
    }

    pub async fn read(archive: &Archive, month: Month, version: u32) -> Result<Manifest, ArchiveError> {
        let key = key(month, version);
        let bytes = archive.get(&key).await?.ok_or_else(|| ArchiveError::Manifest {
            key: key.clone(),
            reason: "listed but not found".into(),
        })?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Manifest {
            key: key.clone(),
            reason: format!("not a manifest: {e}"),
        })?;
        if manifest.format != FORMAT || manifest.month != month.to_string() || manifest.version != version {
            return Err(ArchiveError::Manifest {
                key,
                reason: format!(
                    "says format {:?}, month {}, version {}",
                    manifest.format, manifest.month, manifest.version
                ),
            });
        }
        Ok(manifest)
    }

    pub async fn publish(&self, archive: &Archive) -> Result<(), ArchiveError> {
        let month = Month::parse(&self.month)
            .ok_or_else(|| ArchiveError::Manifest { key: self.month.clone(), reason: "bad month".into() })?;
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| ArchiveError::Manifest { key: key(month, self.version), reason: e.to_string() })?;
        archive.put(&key(month, self.version), bytes).await
    }
}

/// The record that a month's rows were dropped from ClickHouse after `version` was verified:
/// `events/year=2026/month=10/dropped.json`, rewritten at each drop and removed by `restore`.
/// Readers of raw rows take a dropped month from the archive (and from ClickHouse only the rows
/// of files added after `version`'s, which can be there too while a later pass drops them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub month: String,
    pub version: u32,
    pub dropped_at: String,
    pub rows_dropped: u64,
}

pub fn dropped_key(month: Month) -> String {
    format!("{}dropped.json", month.prefix())
}

impl Dropped {
    pub fn now(month: Month, version: u32, rows_dropped: u64) -> Dropped {
        Dropped {
            month: month.to_string(),
            version,
            dropped_at: chrono::Utc::now().to_rfc3339(),
            rows_dropped,
        }
    }

    pub async fn read(archive: &Archive, month: Month) -> Result<Option<Dropped>, ArchiveError> {
        let key = dropped_key(month);
        let Some(bytes) = archive.get(&key).await? else { return Ok(None) };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ArchiveError::Manifest { key, reason: format!("not a drop record: {e}") })
    }

    pub async fn publish(&self, archive: &Archive) -> Result<(), ArchiveError> {
        let month = Month::parse(&self.month)
            .ok_or_else(|| ArchiveError::Manifest { key: self.month.clone(), reason: "bad month".into() })?;
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| ArchiveError::Manifest { key: dropped_key(month), reason: e.to_string() })?;
        archive.put(&dropped_key(month), bytes).await
    }
}
