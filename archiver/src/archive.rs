//! One archiving pass: every closed month of `tally.events` not yet archived is written to
//! Parquet, read back and checked against ClickHouse's exact per-org sums, and only then
//! published by its manifest; with a number of hot months configured, archived months older than
//! them are dropped from ClickHouse after their files are checked once more.

use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tally_common::ch::ChConfig;

use crate::columns::{self, SCHEMA_VERSION};
use crate::config::ArchiverConfig;
use crate::error::ArchiveError;
use crate::late;
use crate::manifest::{self, FileEntry, Manifest, Source};
use crate::month::Month;
use crate::source::{self, Lock};
use crate::store::Archive;
use crate::totals::{differences, total, OrgSums};
use crate::verify;
use crate::writer::{PartWriter, Spooled};

/// What a pass did with one month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Still receiving events (or within the lag margin): left alone.
    Open,
    /// Archived now, as this manifest version.
    Archived { version: u32, rows: u64, files: usize, seconds: u64 },
    /// Its latest manifest holds exactly what ClickHouse holds.
    UpToDate { version: u32 },
    /// Archived and no longer in ClickHouse.
    Dropped { version: u32 },
    /// Every row ClickHouse holds is in the archive, but not every archived row is in ClickHouse
    /// (rows arrived after a drop and were archived, or rows were deleted).
    HeldInArchive { version: u32, rows_held: u64 },
    /// ClickHouse holds rows the latest manifest lacks (they arrived after this pass archived the
    /// month): left in ClickHouse, never dropped; the next pass archives them.
    ChangedSinceArchived { version: u32, orgs: Vec<String> },
    /// Dropped from ClickHouse by this pass's retention.
    DroppedNow { version: u32, rows: u64 },
    /// Loaded back into ClickHouse from this manifest version by `restore`.
    Restored { version: u32, rows: u64 },
    /// Another archiver holds the month's lock: left to it.
    Busy,
    /// This month failed (the reason says what to do); the pass went on with the others.
    Failed { reason: String },
}

#[derive(Debug, Serialize)]
pub struct MonthReport {
    pub month: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The spool directory of one pass (removed at the end).
fn spool_dir() -> Result<PathBuf, ArchiveError> {
    let dir =
        std::env::temp_dir().join(format!("tally-archiver-{}-{}", std::process::id(), uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).map_err(ArchiveError::Spool)?;
    Ok(dir)
}

/// Archives every closed month, then applies retention.
pub async fn run(
    config: &ArchiverConfig,
    archive: &Archive,
    now: DateTime<Utc>,
) -> Result<Vec<MonthReport>, ArchiveError> {
    let spool = spool_dir()?;
    let result = run_in(config, archive, now, &spool).await;
    let _ = std::fs::remove_dir_all(&spool);
    result
}

async fn run_in(
    config: &ArchiverConfig,
    archive: &Archive,
    now: DateTime<Utc>,
    spool: &Path,
) -> Result<Vec<MonthReport>, ArchiveError> {
    let ch = &config.common.clickhouse;
    let mut reports = Vec::new();
    for month in source::months(ch).await? {
        let outcome = if month.is_closed(now, config.lag_margin) {
            archive_month(config, archive, month, spool).await
        } else {
            Ok(Outcome::Open)
        };
        let outcome = match (outcome, config.hot_months) {
            (Ok(Outcome::UpToDate { version }), Some(hot))
            | (Ok(Outcome::HeldInArchive { version, .. }), Some(hot))
            | (Ok(Outcome::Archived { version, .. }), Some(hot))
                if month < Month::first_hot(now, hot) =>
            {
                drop_month(config, archive, month, version, spool).await
            }
            (outcome, _) => outcome,
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(ArchiveError::Locked(..)) => Outcome::Busy,
            Err(error) => {
                tracing::error!(month = %month, error = %error, "month failed");
                Outcome::Failed { reason: error.to_string() }
            }
        };
        tracing::info!(month = %month, outcome = ?outcome, "month done");
        reports.push(MonthReport { month: month.to_string(), outcome });
    }
    Ok(reports)
}

/// Archives one closed month if ClickHouse holds rows its latest manifest does not.
pub async fn archive_month(
    config: &ArchiverConfig,
    archive: &Archive,
    month: Month,
    spool: &Path,
) -> Result<Outcome, ArchiveError> {
    let ch = &config.common.clickhouse;
    let latest = Manifest::latest(archive, month).await?;
    let held = source::sums(ch, month).await?;
    if let Some(outcome) = settled(latest.as_ref(), &held) {
        return Ok(outcome);
    }
    let lock = Lock::take(ch, month, config.lock_stale_after).await?;
    let result = archive_locked(config, archive, month, spool).await;
    lock.release().await?;
    result
}

/// What to do about a month given its latest manifest and ClickHouse's sums: None = archive it
/// (the whole month, or the rows its archive lacks).
fn settled(latest: Option<&Manifest>, held: &OrgSums) -> Option<Outcome> {
    match latest {
        None if held.is_empty() => Some(Outcome::Open),
        Some(m) if held.is_empty() => Some(Outcome::Dropped { version: m.version }),
        Some(m) if m.orgs == *held => Some(Outcome::UpToDate { version: m.version }),
        _ => None,
    }
}

async fn archive_locked(
    config: &ArchiverConfig,
    archive: &Archive,
    month: Month,
    spool: &Path,
) -> Result<Outcome, ArchiveError> {
    let started = Instant::now();
    let ch = &config.common.clickhouse;
    // Another archiver may have published while this one waited for the lock.
    let latest = Manifest::latest(archive, month).await?;
    let snapshot = Snapshot { at: Utc::now(), parts: source::parts(ch, month).await? };
    let held = source::sums(ch, month).await?;
    if let Some(outcome) = settled(latest.as_ref(), &held) {
        return Ok(outcome);
    }
    let outcome = match latest {
        None => archive_whole(config, archive, month, snapshot, &held, spool).await?,
        Some(previous) => archive_late(config, archive, month, snapshot, &previous, &held, spool).await?,
    };
    Ok(match outcome {
        Outcome::Archived { version, rows, files, .. } => {
            Outcome::Archived { version, rows, files, seconds: started.elapsed().as_secs() }
        }
        other => other,
    })
}

/// ClickHouse's state of the month when its sums were taken.
struct Snapshot {
    at: DateTime<Utc>,
    parts: Vec<String>,
}

/// The manifest of `version` of `month` naming `files`, which hold `orgs`.
fn new_manifest(
    ch: &ChConfig,
    month: Month,
    version: u32,
    snapshot: Snapshot,
    files: Vec<FileEntry>,
    orgs: OrgSums,
) -> Manifest {
    Manifest {
        format: manifest::FORMAT.into(),
        schema_version: SCHEMA_VERSION,
        month: month.to_string(),
        version,
        created_at: Utc::now().to_rfc3339(),
        source: Source {
            database: ch.database.clone(),
            table: "events".into(),
            partition: month.partition(),
            snapshot_at: snapshot.at.to_rfc3339(),
            parts: snapshot.parts,
        },
        files,
        totals: total(&orgs),
        orgs,
        verified: "every file read back from the store: size, SHA-256, schema, per-org rows and exact sums equal ClickHouse's".into(),
    }
}

/// The first archive of a month: every row, checked against the snapshot's sums.
async fn archive_whole(
    config: &ArchiverConfig,
    archive: &Archive,
    month: Month,
    snapshot: Snapshot,
    held: &OrgSums,
    spool: &Path,
) -> Result<Outcome, ArchiveError> {
    let ch = &config.common.clickhouse;
    let expected_rows = total(held).rows;
    tracing::info!(month = %month, version = 1, rows = expected_rows, orgs = held.len(), "archiving");
    let (files, written) = write_files(config, archive, month, 1, spool, expected_rows).await?;
    let differ = differences(&written, held);
    if !differ.is_empty() {
        return Err(ArchiveError::Mismatch {
            month: month.to_string(),
            reason: format!(
                "the rows read differ from the snapshot for {} org(s) (rows arrived while archiving?); nothing was published, re-run later: {}",
                differ.len(),
                differ.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
            ),
        });
    }
    let manifest = new_manifest(ch, month, 1, snapshot, files, held.clone());
    verify::check_manifest(archive, &manifest, spool).await?;
    manifest.publish(archive).await?;
    Ok(Outcome::Archived { version: 1, rows: manifest.totals.rows, files: manifest.files.len(), seconds: 0 })
}

/// A month archived before whose ClickHouse rows differ from its manifest: the rows the archive
/// lacks (by identity) are written as additional files, and a new manifest version names the
/// previous files and the new ones. Rows the archive has are never written again.
async fn archive_late(
    config: &ArchiverConfig,
    archive: &Archive,
    month: Month,
    snapshot: Snapshot,
    previous: &Manifest,
    held: &OrgSums,
    spool: &Path,
) -> Result<Outcome, ArchiveError> {
    let ch = &config.common.clickhouse;
    let version = previous.version + 1;
    let orgs = late::changed_orgs(held, &previous.orgs);
    tracing::info!(month = %month, version, orgs = orgs.len(), "comparing ClickHouse's rows with the archive");
    let found = late::find(config, archive, month, previous, &orgs, version, spool).await?;
    if found.rows == 0 {
        return Ok(Outcome::HeldInArchive { version: previous.version, rows_held: total(held).rows });
    }
    tracing::info!(month = %month, version, rows = found.rows, "archiving rows the archive lacks");
    let mut files = previous.files.clone();
    let mut added = OrgSums::new();
    for (part, spooled) in found.files.into_iter().enumerate() {
        files.push(upload(archive, month, version, part, spooled, &mut added).await?);
    }
    let mut orgs = previous.orgs.clone();
    for (org, sums) in &added {
        orgs.entry(org.clone()).or_default().add(sums);
    }
    let new_files = files.len() - previous.files.len();
    let manifest = new_manifest(ch, month, version, snapshot, files, orgs);
    verify::check_manifest(archive, &manifest, spool).await?;
    manifest.publish(archive).await?;
    Ok(Outcome::Archived { version, rows: found.rows, files: new_files, seconds: 0 })
}

/// Streams the month out of ClickHouse chunk by chunk into files of at most `file_rows` rows,
/// each uploaded as soon as it is complete. Returns the entries and the sums of the rows written.
async fn write_files(
    config: &ArchiverConfig,
    archive: &Archive,
    month: Month,
    version: u32,
    spool: &Path,
    expected_rows: u64,
) -> Result<(Vec<FileEntry>, OrgSums), ArchiveError> {
    let ch = &config.common.clickhouse;
    let schema = columns::schema()?;
    let new_part = |part: usize| {
        PartWriter::create(
            spool.join(format!("part-{part:05}.parquet")),
            schema.clone(),
            config.row_group_bytes,
        )
    };
    let mut files = Vec::new();
    let mut written = OrgSums::new();
    let mut writer = new_part(0)?;
    let mut done = 0u64;
    let mut last_report = Instant::now();
    for chunk in source::plan(ch, month, config.chunk_rows).await? {
        let mut cursor = source::rows(ch, month, &chunk)?;
        while let Some(row) = cursor.next().await? {
            writer.append(row)?;
            done += 1;
            if writer.rows() >= config.file_rows {
                let next = new_part(files.len() + 1)?;
                let full = std::mem::replace(&mut writer, next);
                files.push(upload(archive, month, version, files.len(), full.finish()?, &mut written).await?);
            }
            if last_report.elapsed().as_secs() >= 10 {
                tracing::info!(month = %month, rows = done, of = expected_rows, "archiving: {:.0} %", done as f64 * 100.0 / expected_rows.max(1) as f64);
                last_report = Instant::now();
            }
        }
    }
    if writer.rows() > 0 || files.is_empty() {
        files.push(upload(archive, month, version, files.len(), writer.finish()?, &mut written).await?);
    }
    Ok((files, written))
}

async fn upload(
    archive: &Archive,
    month: Month,
    version: u32,
    part: usize,
    spooled: Spooled,
    written: &mut OrgSums,
) -> Result<FileEntry, ArchiveError> {
    let key = manifest::file_key(month, version, part);
    let (bytes, sha256) = archive.upload_file(&key, &spooled.path).await?;
    let _ = std::fs::remove_file(&spooled.path);
    for (org, sums) in &spooled.orgs {
        written.entry(org.clone()).or_default().add(sums);
    }
    tracing::info!(key = %key, rows = spooled.rows, bytes, "uploaded");
    Ok(FileEntry { path: key, bytes, rows: spooled.rows, sha256, row_groups: spooled.row_groups })
}

/// Drops an archived month from ClickHouse: its files are read back and checked against the
/// manifest, and ClickHouse's rows re-checked just before the drop: their sums equal the
/// manifest's, or (after late rows were archived) every row held is in the archive by identity.
/// The drop is recorded next to the manifests (`dropped.json`) for readers of the archive.
async fn drop_month(
    config: &ArchiverConfig,
    archive: &Archive,
    month: Month,
    version: u32,
    spool: &Path,
) -> Result<Outcome, ArchiveError> {
    let ch = &config.common.clickhouse;
    let manifest = Manifest::read(archive, month, version).await?;
    verify::check_manifest(archive, &manifest, spool).await?;
    let lock = Lock::take(ch, month, config.lock_stale_after).await?;
    let result = drop_locked(config, archive, month, &manifest, spool).await;
    lock.release().await?;
    result
}

async fn drop_locked(
    config: &ArchiverConfig,
    archive: &Archive,
    month: Month,
    manifest: &Manifest,
    spool: &Path,
) -> Result<Outcome, ArchiveError> {
    let ch = &config.common.clickhouse;
    let held = source::sums(ch, month).await?;
    if held != manifest.orgs {
        let orgs = late::changed_orgs(&held, &manifest.orgs);
        let found = late::find(config, archive, month, manifest, &orgs, manifest.version + 1, spool).await?;
        for spooled in &found.files {
            let _ = std::fs::remove_file(&spooled.path);
        }
        if found.rows > 0 {
            return Ok(Outcome::ChangedSinceArchived {
                version: manifest.version,
                orgs: orgs.into_iter().collect(),
            });
        }
    }
    // The record first: from then on readers take the month from the archive, and from ClickHouse
    // only rows the archive does not hold (by identity), so they count every row once before,
    // during and after the drop. The grace lets every query API's cache see it.
    manifest::Dropped::now(month, manifest.version, total(&held).rows).publish(archive).await?;
    tokio::time::sleep(config.drop_grace).await;
    let now_held = source::sums(ch, month).await?;
    if now_held != held {
        // Rows arrived during the grace: the next pass archives them and drops then (the record
        // stays; readers stay exact with the rows in both places).
        return Ok(Outcome::ChangedSinceArchived {
            version: manifest.version,
            orgs: late::changed_orgs(&now_held, &held).into_iter().collect(),
        });
    }
    source::drop_partition(ch, month).await?;
    Ok(Outcome::DroppedNow { version: manifest.version, rows: total(&held).rows })
}

/// Re-checks every published manifest (its latest version per month) against its files.
pub async fn verify_all(archive: &Archive) -> Result<Vec<(String, Result<u32, String>)>, ArchiveError> {
    let spool = spool_dir()?;
    let mut months: Vec<Month> =
        archive.list("events/").await?.iter().filter_map(|(key, _)| Month::of_key(key)).collect();
    months.sort_unstable();
    months.dedup();
    let mut results = Vec::new();
    for month in months {
        let checked = match Manifest::latest(archive, month).await {
            Ok(Some(manifest)) => verify::check_manifest(archive, &manifest, &spool)
                .await
                .map(|_| manifest.version)
                .map_err(|e| e.to_string()),
            Ok(None) => {
                Err("files but no manifest (an interrupted run; they are not part of the archive)".into())
            }
            Err(e) => Err(e.to_string()),
        };
        results.push((month.to_string(), checked));
    }
    let _ = std::fs::remove_dir_all(&spool);
    Ok(results)
}

/// Loads an archived month back into ClickHouse, exactly once: the files of its latest manifest
/// are checked, staged in `events_restore_<YYYYMM>`, their per-org sums compared with the
/// manifest's, and the partition attached to `events` in one step. A month ClickHouse already
/// holds exactly is left alone (a second restore adds nothing); one holding other rows is refused
/// (restore into an empty month only). The rollups are not touched: they kept the month.
pub async fn restore(
    config: &ArchiverConfig,
    archive: &Archive,
    month: Month,
) -> Result<Outcome, ArchiveError> {
    let ch = &config.common.clickhouse;
    let manifest = Manifest::latest(archive, month).await?.ok_or_else(|| ArchiveError::Mismatch {
        month: month.to_string(),
        reason: "it was never archived (no manifest)".into(),
    })?;
    let lock = Lock::take(ch, month, config.lock_stale_after).await?;
    let spool = spool_dir()?;
    let result = restore_locked(ch, archive, month, &manifest, &spool).await;
    let _ = std::fs::remove_dir_all(&spool);
    lock.release().await?;
    result
}

async fn restore_locked(
    ch: &ChConfig,
    archive: &Archive,
    month: Month,
    manifest: &Manifest,
    spool: &Path,
) -> Result<Outcome, ArchiveError> {
    let held = source::sums(ch, month).await?;
    if held == manifest.orgs {
        return Ok(Outcome::UpToDate { version: manifest.version });
    }
    if !held.is_empty() {
        return Err(ArchiveError::Mismatch {
            month: month.to_string(),
            reason: format!(
                "ClickHouse holds {} rows of it that are not the archive's; restore only into an empty month",
                total(&held).rows
            ),
        });
    }
    verify::check_manifest(archive, manifest, spool).await?;
    let staging = source::create_staging(ch, month).await?;
    for entry in &manifest.files {
        let local = spool.join("restore.parquet");
        archive.download(&entry.path, &local).await?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&local).map_err(ArchiveError::Spool)?,
        )?
        .with_batch_size(65_536)
        .build()?;
        for batch in reader {
            source::insert(ch, &staging, crate::rows::rows_of(&batch?)?).await?;
        }
        let _ = std::fs::remove_file(&local);
    }
    let staged = source::sums_of(ch, &staging).await?;
    let differ = differences(&staged, &manifest.orgs);
    if !differ.is_empty() {
        return Err(ArchiveError::Mismatch {
            month: month.to_string(),
            reason: format!("the staged rows differ from the manifest: {}", differ.join("; ")),
        });
    }
    // The rows back first, then the record removed: meanwhile readers take archived rows from the
    // archive and skip ClickHouse's copies of them (by identity), so they never miss or double one.
    source::attach_staging(ch, month, &staging).await?;
    archive.delete(&manifest::dropped_key(month)).await?;
    Ok(Outcome::Restored { version: manifest.version, rows: manifest.totals.rows })
}
