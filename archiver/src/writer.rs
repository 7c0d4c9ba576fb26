//! Writes rows into Parquet files in a local spool directory: zstd, row groups flushed by size
//! (bounded memory), statistics and page indexes on, the sort order (org, then time) declared in
//! the footer so a reader of one org skips the other orgs' row groups.

use std::fs::File;
use std::path::PathBuf;

use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use tally_schemas::EventRow;

use crate::columns::Columns;
use crate::error::ArchiveError;
use crate::totals::{OrgSums, Sums};

/// Rows per Arrow batch handed to the Parquet writer.
const BATCH_ROWS: usize = 8192;

/// A finished file in the spool directory.
pub struct Spooled {
    pub path: PathBuf,
    pub rows: u64,
    pub row_groups: usize,
    pub orgs: OrgSums,
}

pub struct PartWriter {
    path: PathBuf,
    writer: ArrowWriter<File>,
    columns: Columns,
    rows: u64,
    orgs: OrgSums,
    /// The org of the last row and its running sums (rows come sorted by org).
    current: Option<(String, Sums)>,
}

/// Columns whose values rarely repeat: PLAIN (then zstd) beats a dictionary that overflows.
const NO_DICTIONARY: [&str; 4] = ["timestamp", "received_at", "event_id", "kafka_offset"];

/// Free text and per-request ids: in files sorted by org then time their min/max prune nothing,
/// and computing them (a comparison per value) was a tenth of the archiver's CPU.
const NO_STATISTICS: [&str; 5] = ["error", "execution_id", "agent_id", "action", "request_id"];

/// Measured on 3 M events (loadtest/RESULTS.md, "Archiver"): zstd 6 rather than 3, pages of up to
/// 200 000 rows rather than 20 000 (zstd works per page) and no dictionary for `NO_DICTIONARY`
/// took the file from 10.5 to 6.8 bytes per event at the same speed (the ClickHouse read bounds it).
fn properties(row_group_bytes: usize) -> WriterProperties {
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(6).unwrap_or_default()))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_data_page_row_count_limit(200_000);
    for column in NO_DICTIONARY {
        builder = builder.set_column_dictionary_enabled(column.into(), false);
    }
    for column in NO_STATISTICS {
        builder = builder.set_column_statistics_enabled(column.into(), EnabledStatistics::None);
    }
    builder
        // Row groups are cut by their estimated encoded size, not by a row count (bounded memory
        // whatever the rows).
        .set_max_row_group_row_count(None)
        .set_max_row_group_bytes(Some(row_group_bytes.max(1)))
        .set_sorting_columns(Some(vec![
            SortingColumn { column_idx: 0, descending: false, nulls_first: false },
            SortingColumn { column_idx: 2, descending: false, nulls_first: false },
        ]))
        .set_created_by(format!("tally-archiver {}", env!("CARGO_PKG_VERSION")))
        .build()
}

impl PartWriter {
    pub fn create(
        path: PathBuf,
        schema: SchemaRef,
        row_group_bytes: usize,
    ) -> Result<PartWriter, ArchiveError> {
        let file = File::create(&path).map_err(ArchiveError::Spool)?;
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(properties(row_group_bytes)))?;
        Ok(PartWriter {
            path,
            writer,
            columns: Columns::new(schema),
            rows: 0,
            orgs: OrgSums::new(),
            current: None,
        })
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn append(&mut self, row: EventRow) -> Result<(), ArchiveError> {
        let sums = Sums {
            rows: 1,
            cost_nanos: row.cost_nanos,
            prompt_tokens: u64::from(row.prompt_tokens),
            completion_tokens: u64::from(row.completion_tokens),
            total_tokens: u64::from(row.total_tokens),
        };
        match &mut self.current {
            Some((org, running)) if *org == row.org_id => running.add(&sums),
            _ => {
                self.close_org();
                self.current = Some((row.org_id.clone(), sums));
            }
        }
        self.columns.append(row)?;
        self.rows += 1;
        if self.columns.rows >= BATCH_ROWS {
            self.write_batch()?;
        }
        Ok(())
    }

    fn close_org(&mut self) {
        if let Some((org, sums)) = self.current.take() {
            self.orgs.entry(org).or_default().add(&sums);
        }
    }

    fn write_batch(&mut self) -> Result<(), ArchiveError> {
        if self.columns.rows == 0 {
            return Ok(());
        }
        let batch = self.columns.finish()?;
        self.writer.write(&batch)?;
        Ok(())
    }

    pub fn finish(mut self) -> Result<Spooled, ArchiveError> {
        self.write_batch()?;
        self.close_org();
        let metadata = self.writer.close()?;
        Ok(Spooled {
            path: self.path,
            rows: self.rows,
            row_groups: metadata.num_row_groups(),
            orgs: self.orgs,
        })
    }
}
