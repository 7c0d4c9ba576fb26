//! Reading one org's rows of an archived file through the object store, as a per-org reader of
//! the archive does: the footer first, then only the row groups whose `org_id` statistics admit
//! the org (the files are sorted by org, so its rows sit in a few consecutive row groups), within
//! them only the pages the page index admits, and only the columns asked for, each fetched by
//! ranged requests.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, RowSelection};
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStream};
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use parquet::errors::ParquetError;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::page_index::column_index::ColumnIndexMetaData;
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
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let mut reader = ParquetMetaDataReader::new().with_prefetch_hint(Some(FOOTER_HINT));
            if let Some(options) = options {
                reader = reader
                    .with_column_index_policy(options.column_index_policy())
                    .with_offset_index_policy(options.offset_index_policy());
            }
            let metadata = reader.load_and_finish(self, size).await?;
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

/// The rows of the selected row groups (in order) whose pages' `org_id` bounds admit `org`, from
/// the page index: a row group holds several orgs, and its pages (up to 200 000 rows) fewer.
/// None when a row group has no page index (then whole row groups are read).
fn org_pages(metadata: &ParquetMetaData, groups: &[usize], org: &str) -> Option<RowSelection> {
    let org = org.as_bytes();
    let mut ranges = Vec::new();
    let mut base = 0usize;
    for &group in groups {
        let rows = usize::try_from(metadata.row_group(group).num_rows()).ok()?;
        let index = metadata.page_index_for_row_group(group);
        let (Some(ColumnIndexMetaData::BYTE_ARRAY(bounds)), Some(pages)) =
            (index.column_index(0), index.page_locations(0))
        else {
            return None;
        };
        for (i, page) in pages.iter().enumerate() {
            let first = usize::try_from(page.first_row_index).ok()?;
            let end =
                pages.get(i + 1).map_or(Some(rows), |next| usize::try_from(next.first_row_index).ok())?;
            // A truncated maximum is rounded up by the writer: the bounds never exclude a match.
            let admits = match (bounds.min_value(i), bounds.max_value(i)) {
                (Some(min), Some(max)) => min <= org && org <= max,
                _ => true,
            };
            if admits {
                ranges.push(base + first..base + end);
            }
        }
        base += rows;
    }
    Some(RowSelection::from_consecutive_ranges(ranges.into_iter(), base))
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
    let (store, path) = archive.object(&entry.path);
    let mut reader = ArchiveFile::new(store, path, entry.bytes);
    let fetched = reader.fetched();
    let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional);
    let metadata = ArrowReaderMetadata::load_async(&mut reader, options).await?;
    let schema = metadata.schema().clone();
    let indices: Vec<usize> = columns.iter().map(|name| schema.index_of(name)).collect::<Result<_, _>>()?;
    let groups = org_row_groups(metadata.metadata(), org);
    let (row_groups, row_groups_read) = (metadata.metadata().num_row_groups(), groups.len());
    let mask = ProjectionMask::roots(metadata.metadata().file_metadata().schema_descr(), indices);
    let pages = org_pages(metadata.metadata(), &groups, org);
    let mut builder = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, metadata)
        .with_row_groups(groups)
        .with_projection(mask)
        .with_batch_size(65_536);
    if let Some(pages) = pages {
        builder = builder.with_row_selection(pages);
    }
    let batches = builder.build()?;
    Ok(OrgRead { batches, row_groups, row_groups_read, fetched })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt32Type;
    use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt32Array};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ArrowWriter;
    use parquet::data_type::ByteArray;
    use parquet::file::properties::WriterProperties;
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

    /// A file sorted by org, 10 rows a page, 40 rows a row group: 30 rows of org-a, 30 of org-b,
    /// 25 of org-c; `seq` numbers the rows.
    fn small_file() -> bytes::Bytes {
        let orgs: Vec<&str> =
            [("org-a", 30), ("org-b", 30), ("org-c", 25)].iter().flat_map(|&(o, n)| vec![o; n]).collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("org_id", DataType::Utf8, false),
            Field::new("seq", DataType::UInt32, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(orgs.clone())) as ArrayRef,
                Arc::new(UInt32Array::from_iter_values(0..orgs.len() as u32)),
            ],
        )
        .unwrap();
        let props = WriterProperties::builder()
            .set_data_page_row_count_limit(10)
            .set_write_batch_size(10)
            .set_max_row_group_row_count(Some(40))
            .build();
        let mut out = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut out, schema, Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        out.into()
    }

    #[test]
    fn within_row_groups_only_the_pages_whose_bounds_admit_the_org_are_selected() {
        let file = small_file();
        let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
        let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options).unwrap();
        let metadata = builder.metadata().clone();
        for (org, expected) in [("org-a", 0..30u32), ("org-b", 30..60), ("org-c", 60..85)] {
            let groups = org_row_groups(&metadata, org);
            let pages = org_pages(&metadata, &groups, org).expect("the writer wrote a page index");
            let selected = pages.row_count();
            let reader = ParquetRecordBatchReaderBuilder::try_new(small_file())
                .unwrap()
                .with_row_groups(groups)
                .with_row_selection(pages)
                .build()
                .unwrap();
            let mut seqs = Vec::new();
            for batch in reader {
                let batch = batch.unwrap();
                let (o, s) =
                    (batch.column(0).as_string::<i32>(), batch.column(1).as_primitive::<UInt32Type>());
                seqs.extend((0..batch.num_rows()).filter(|&i| o.value(i) == org).map(|i| s.value(i)));
            }
            // Every row of the org, and only its pages (the orgs' boundaries fall on page
            // boundaries here; whole row groups would be 40 or 80 rows).
            assert_eq!(seqs, expected.clone().collect::<Vec<_>>(), "{org}");
            assert_eq!(selected, expected.len(), "{org}: rows selected");
        }
        let none = org_pages(&metadata, &org_row_groups(&metadata, "org-z"), "org-z").unwrap();
        assert_eq!(none.row_count(), 0);
    }
}
