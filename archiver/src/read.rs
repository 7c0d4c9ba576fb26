//! Reading one org's rows of an archived file through the object store, as a per-org reader of
//! the archive does: the footer first, then only the row groups whose `org_id` statistics admit
//! the org (the files are sorted by org, so its rows sit in a few consecutive row groups) and only
//! the columns asked for, each fetched by ranged requests.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStream};
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::statistics::Statistics;

use crate::error::ArchiveError;
use crate::manifest::FileEntry;
use crate::store::Archive;

/// The footer is read with one request of this many bytes from the end (the metadata of a
/// month's file with its statistics fits; a larger one costs a second request).
const FOOTER_HINT: usize = 256 << 10;

/// An archived Parquet file read through the object store by byte ranges, counting the bytes
/// it fetched.
pub struct ArchiveFile {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
    fetched: Arc<AtomicU64>,
}

impl ArchiveFile {
    pub fn new(store: Arc<dyn ObjectStore>, path: Path, size: u64) -> ArchiveFile {
        ArchiveFile { store, path, size, fetched: Arc::new(AtomicU64::new(0)) }
    }

    /// Bytes fetched so far (footer and data), shared with clones of the counter.
    pub fn fetched(&self) -> Arc<AtomicU64> {
        self.fetched.clone()
    }
}

impl AsyncFileReader for ArchiveFile {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            let bytes = self
                .store
                .get_range(&self.path, range)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))?;
            self.fetched.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            Ok(bytes)
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            let parts = self
                .store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))?;
            let total: usize = parts.iter().map(Bytes::len).sum();
            self.fetched.fetch_add(total as u64, Ordering::Relaxed);
            Ok(parts)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .with_prefetch_hint(Some(FOOTER_HINT))
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

/// Whether a row group whose `org_id` statistics are `stats` may hold rows of `org` (no
/// statistics, or inexact bounds, admit it: pruning only ever skips what cannot match).
fn admits(stats: Option<&Statistics>, org: &str) -> bool {
    let Some(stats) = stats else { return true };
    let org = org.as_bytes();
    let above_min = stats.min_bytes_opt().is_none_or(|min| min <= org);
    let below_max = !stats.max_is_exact() || stats.max_bytes_opt().is_none_or(|max| org <= max);
    above_min && below_max
}

/// The row groups of a file that may hold `org`'s rows.
pub fn org_row_groups(metadata: &ParquetMetaData, org: &str) -> Vec<usize> {
    (0..metadata.num_row_groups())
        .filter(|&i| admits(metadata.row_group(i).column(0).statistics(), org))
        .collect()
}

/// A per-org read of one file: its batches, and what it selected and fetched.
pub struct OrgRead {
    pub batches: ParquetRecordBatchStream<ArchiveFile>,
    pub row_groups: usize,
    pub row_groups_read: usize,
    /// Bytes fetched from the store so far (the footer, then the chunks as the stream reads them).
    pub fetched: Arc<AtomicU64>,
}

/// The batches of `entry`'s row groups that may hold `org`'s rows, with only `columns` (in the
/// file's order). Rows of neighbouring orgs sharing a row group come too: callers keep the rows
/// whose `org_id` is `org`.
pub async fn org_batches(
    archive: &Archive,
    entry: &FileEntry,
    org: &str,
    columns: &[&str],
) -> Result<OrgRead, ArchiveError> {
    let mut reader = archive.file_reader(entry);
    let fetched = reader.fetched();
    let metadata = ArrowReaderMetadata::load_async(&mut reader, Default::default()).await?;
    let schema = metadata.schema().clone();
    let indices: Vec<usize> = columns.iter().map(|name| schema.index_of(name)).collect::<Result<_, _>>()?;
    let groups = org_row_groups(metadata.metadata(), org);
    let (row_groups, row_groups_read) = (metadata.metadata().num_row_groups(), groups.len());
    let mask = ProjectionMask::roots(metadata.metadata().file_metadata().schema_descr(), indices);
    let batches = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, metadata)
        .with_row_groups(groups)
        .with_projection(mask)
        .with_batch_size(65_536)
        .build()?;
    Ok(OrgRead { batches, row_groups, row_groups_read, fetched })
}

#[cfg(test)]
mod tests {
    use parquet::data_type::ByteArray;
    use parquet::file::statistics::ValueStatistics;

    use super::*;

    fn stats(min: &str, max: &str, max_exact: bool) -> Statistics {
        Statistics::ByteArray(
            ValueStatistics::new(
                Some(ByteArray::from(min)),
                Some(ByteArray::from(max)),
                None,
                Some(0),
                false,
            )
            .with_max_is_exact(max_exact),
        )
    }

    #[test]
    fn a_row_group_is_skipped_only_when_its_bounds_exclude_the_org() {
        let group = stats("org-b", "org-d", true);
        assert!(
            admits(Some(&group), "org-b") && admits(Some(&group), "org-c") && admits(Some(&group), "org-d")
        );
        assert!(!admits(Some(&group), "org-a") && !admits(Some(&group), "org-e"));
        // A truncated (inexact) maximum never excludes; no statistics admit everything.
        assert!(admits(Some(&stats("org-b", "org-d", false)), "org-e"));
        assert!(admits(None, "anything"));
    }
}
