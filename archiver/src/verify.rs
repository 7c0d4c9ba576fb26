//! Reading archived files back: size and SHA-256 against the manifest's entry, the Parquet schema
//! against the archive's, and per-org rows and exact sums from the columns themselves.

use std::fs::File;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, UInt32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::error::ArchiveError;
use crate::manifest::{FileEntry, Manifest};
use crate::store::Archive;
use crate::totals::{differences, OrgSums, Sums};

const SUMMED: [&str; 5] = ["org_id", "cost", "prompt_tokens", "completion_tokens", "total_tokens"];

/// The per-org sums of a local Parquet file of the archive, read from its columns.
pub fn sums_of_file(path: &Path) -> Result<(u64, OrgSums), ArchiveError> {
    let file = File::open(path).map_err(ArchiveError::Spool)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let expected = crate::columns::schema()?;
    if builder.schema().fields() != expected.fields() {
        return Err(ArchiveError::Manifest {
            key: path.display().to_string(),
            reason: "its schema is not the archive's".into(),
        });
    }
    let indices: Vec<usize> = SUMMED.iter().map(|name| expected.index_of(name)).collect::<Result<_, _>>()?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
    let reader = builder.with_projection(mask).with_batch_size(65_536).build()?;
    let mut orgs = OrgSums::new();
    let mut rows = 0u64;
    for batch in reader {
        let batch = batch?;
        // A projection keeps the file's column order: look the columns up by name.
        let column = |name: &str| {
            batch.column_by_name(name).ok_or_else(|| ArchiveError::Manifest {
                key: path.display().to_string(),
                reason: format!("has no column {name}"),
            })
        };
        let org = column("org_id")?.as_string::<i32>();
        let cost = column("cost")?.as_primitive::<Decimal128Type>();
        let tokens = [column("prompt_tokens")?, column("completion_tokens")?, column("total_tokens")?]
            .map(|c| c.as_primitive::<UInt32Type>());
        // Files are sorted by org: add up each run of one org's rows, then look the org up once
        // (a map lookup per row was a fifth of the archiver's CPU).
        let mut start = 0;
        while start < batch.num_rows() {
            let current = org.value(start);
            let mut run = Sums::default();
            let mut i = start;
            while i < batch.num_rows() && org.value(i) == current {
                run.rows += 1;
                run.cost_nanos += i64::try_from(cost.value(i)).unwrap_or(i64::MAX);
                run.prompt_tokens += u64::from(tokens[0].value(i));
                run.completion_tokens += u64::from(tokens[1].value(i));
                run.total_tokens += u64::from(tokens[2].value(i));
                i += 1;
            }
            match orgs.get_mut(current) {
                Some(sums) => sums.add(&run),
                None => {
                    orgs.insert(current.to_owned(), run);
                }
            }
            start = i;
        }
        rows += batch.num_rows() as u64;
    }
    Ok((rows, orgs))
}

/// Downloads one file of a manifest into `spool` and checks it; its per-org sums.
pub async fn check_file(archive: &Archive, entry: &FileEntry, spool: &Path) -> Result<OrgSums, ArchiveError> {
    let local = spool.join(entry.path.replace('/', "_"));
    let fail = |reason: String| ArchiveError::Manifest { key: entry.path.clone(), reason };
    let (bytes, sha256) = archive.download(&entry.path, &local).await?;
    if bytes != entry.bytes || sha256 != entry.sha256 {
        let _ = std::fs::remove_file(&local);
        return Err(fail(format!(
            "is {bytes} bytes with SHA-256 {sha256}; the manifest says {} bytes, {}",
            entry.bytes, entry.sha256
        )));
    }
    let path = local.clone();
    let read = tokio::task::spawn_blocking(move || sums_of_file(&path))
        .await
        .map_err(|e| fail(format!("reader task failed: {e}")))?;
    let _ = std::fs::remove_file(&local);
    let (rows, orgs) = read.map_err(|e| fail(format!("does not read as Parquet: {e}")))?;
    if rows != entry.rows {
        return Err(fail(format!("has {rows} rows; the manifest says {}", entry.rows)));
    }
    Ok(orgs)
}

/// Reads every file of `manifest` back and checks the per-org sums they hold against the
/// manifest's. Returns the sums read.
pub async fn check_manifest(
    archive: &Archive,
    manifest: &Manifest,
    spool: &Path,
) -> Result<OrgSums, ArchiveError> {
    let mut read = OrgSums::new();
    for entry in &manifest.files {
        for (org, sums) in check_file(archive, entry, spool).await? {
            read.entry(org).or_default().add(&sums);
        }
    }
    let differ = differences(&read, &manifest.orgs);
    if !differ.is_empty() {
        return Err(ArchiveError::Mismatch {
            month: manifest.month.clone(),
            reason: format!(
                "the files' sums differ from the manifest's for {} org(s): {}",
                differ.len(),
                differ.join("; ")
            ),
        });
    }
    Ok(read)
}
