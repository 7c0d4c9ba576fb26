//! Rows of an archived month that its archive lacks: a dead-letter replay, an operator backfill,
//! or rows that reached ClickHouse after the month was dropped. A row's identity is its event id
//! and its position in the events topic (partition, offset, index in the message): the consumer
//! writes a position once, and a re-sent event gets a new one. Only the orgs whose sums differ from
//! the manifest's are compared; their archived identities are read from the files (their row
//! groups only) and held in memory while their rows stream out of ClickHouse.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt32Type, UInt64Type};
use futures::StreamExt;
use tally_schemas::EventRow;

use crate::config::ArchiverConfig;
use crate::error::ArchiveError;
use crate::manifest::{FileEntry, Manifest};
use crate::month::Month;
use crate::read::org_batches;
use crate::source;
use crate::store::Archive;
use crate::totals::OrgSums;
use crate::writer::{PartWriter, Spooled};

/// (event id, Kafka partition, offset, index in the message).
pub type Identity = (u128, u16, u64, u32);

pub fn identity(row: &EventRow) -> Identity {
    (row.event_id.as_u128(), row.kafka_partition, row.kafka_offset, row.kafka_index)
}

const ID_COLUMNS: [&str; 5] = ["org_id", "event_id", "kafka_partition", "kafka_offset", "kafka_index"];

/// The identities of `org`'s rows in `files`.
pub async fn archived(
    archive: &Archive,
    files: &[FileEntry],
    org: &str,
) -> Result<HashSet<Identity>, ArchiveError> {
    let mut ids = HashSet::new();
    for entry in files {
        let mut read = org_batches(archive, entry, org, &ID_COLUMNS).await?;
        while let Some(batch) = read.batches.next().await {
            let batch = batch?;
            let column = |name: &str| {
                batch.column_by_name(name).cloned().ok_or_else(|| ArchiveError::Manifest {
                    key: entry.path.clone(),
                    reason: format!("has no column {name}"),
                })
            };
            let (orgs, event_ids) = (column("org_id")?, column("event_id")?);
            let (orgs, event_ids) = (orgs.as_string::<i32>(), event_ids.as_fixed_size_binary());
            let partitions = column("kafka_partition")?;
            let offsets = column("kafka_offset")?;
            let indices = column("kafka_index")?;
            let (partitions, offsets, indices) = (
                partitions.as_primitive::<UInt16Type>(),
                offsets.as_primitive::<UInt64Type>(),
                indices.as_primitive::<UInt32Type>(),
            );
            for i in (0..batch.num_rows()).filter(|&i| orgs.value(i) == org) {
                let id = <[u8; 16]>::try_from(event_ids.value(i)).map_err(|_| ArchiveError::Manifest {
                    key: entry.path.clone(),
                    reason: "an event_id is not 16 bytes".into(),
                })?;
                ids.insert((
                    u128::from_be_bytes(id),
                    partitions.value(i),
                    offsets.value(i),
                    indices.value(i),
                ));
            }
        }
    }
    Ok(ids)
}

/// What comparing ClickHouse's rows of some orgs with the archive found.
pub struct Found {
    /// The rows the archive lacks, in files of the spool (sorted by org then time).
    pub files: Vec<Spooled>,
    pub rows: u64,
    /// Rows ClickHouse holds that the archive has too.
    pub held_archived: u64,
}

/// Streams `orgs`' rows of `month` out of ClickHouse (in sort order, chunk by chunk) and writes
/// the ones `manifest`'s files lack into spooled files named for `version`.
pub async fn find(
    config: &ArchiverConfig,
    archive: &Archive,
    month: Month,
    manifest: &Manifest,
    orgs: &BTreeSet<String>,
    version: u32,
    spool: &Path,
) -> Result<Found, ArchiveError> {
    let ch = &config.common.clickhouse;
    let mut known: HashMap<&str, HashSet<Identity>> = HashMap::new();
    for org in orgs {
        known.insert(org, archived(archive, &manifest.files, org).await?);
    }
    let schema = crate::columns::schema()?;
    let new_file = |n: usize| {
        PartWriter::create(
            spool.join(format!("late-v{version:04}-{n:05}.parquet")),
            schema.clone(),
            config.row_group_bytes,
        )
    };
    let mut found = Found { files: Vec::new(), rows: 0, held_archived: 0 };
    let mut writer = new_file(0)?;
    let overlaps =
        |chunk: &source::Chunk| orgs.range(chunk.first.0.clone()..=chunk.last.0.clone()).next().is_some();
    for chunk in source::plan(ch, month, config.chunk_rows).await?.into_iter().filter(overlaps) {
        let mut cursor = source::rows(ch, month, &chunk)?;
        while let Some(row) = cursor.next().await? {
            let Some(ids) = known.get(row.org_id.as_str()) else { continue };
            if ids.contains(&identity(&row)) {
                found.held_archived += 1;
                continue;
            }
            writer.append(row)?;
            found.rows += 1;
            if writer.rows() >= config.file_rows {
                let next = new_file(found.files.len() + 1)?;
                found.files.push(std::mem::replace(&mut writer, next).finish()?);
            }
        }
    }
    if writer.rows() > 0 {
        found.files.push(writer.finish()?);
    } else {
        let spooled = writer.finish()?;
        let _ = std::fs::remove_file(spooled.path);
    }
    Ok(found)
}

/// The orgs ClickHouse holds rows of whose sums differ from a manifest's: the only ones that can
/// have rows the archive lacks.
pub fn changed_orgs(held: &OrgSums, archived: &OrgSums) -> BTreeSet<String> {
    held.iter().filter(|(org, sums)| archived.get(*org) != Some(*sums)).map(|(org, _)| org.clone()).collect()
}
