//! The archive's object store: a local directory (`file:///path`, the embedded default) or an S3
//! bucket (`s3://bucket[/prefix]`), both through `object_store`. Objects are written whole
//! (manifests) or as multipart uploads streamed from a local file (Parquet), and never deleted by
//! the archiver (S3Proxy, the local stack's server, refuses object_store's bulk delete; readers
//! ignore files no manifest names).

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::config::ArchiverConfig;
use crate::error::ArchiveError;

/// Multipart chunk size: S3 needs at least 5 MiB per part but the last.
const CHUNK: usize = 8 << 20;

#[derive(Clone)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    /// Key prefix inside the bucket (empty for a directory or a bucket's root).
    prefix: String,
    /// Where it is, for messages (no credentials).
    pub location: String,
}

impl Archive {
    pub fn open(config: &ArchiverConfig) -> Result<Archive, ArchiveError> {
        let url = &config.archive_url;
        if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir)
                .map_err(|e| ArchiveError::Config(format!("archive directory {dir}: {e}")))?;
            let store = LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| ArchiveError::Config(format!("archive directory {dir}: {e}")))?;
            return Ok(Archive { store: Arc::new(store), prefix: String::new(), location: url.clone() });
        }
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| ArchiveError::Config(format!("unsupported archive URL {url}")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // One DELETE per object: the archiver deletes one object at a time (a month's drop
        // record), and S3Proxy, the local stack's server, refuses the bulk `POST /?delete`.
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(&config.s3_region)
            .with_disable_bulk_delete(true)
            .with_retry(object_store::RetryConfig {
                retry_timeout: config.s3_retry_timeout,
                ..Default::default()
            });
        if let Some(credentials) = &config.s3_credentials {
            builder = builder
                .with_access_key_id(&credentials.access_key_id)
                .with_secret_access_key(&credentials.secret_access_key);
        }
        if let Some(endpoint) = &config.s3_endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let store = builder.build().map_err(|e| ArchiveError::Config(format!("S3 archive {url}: {e}")))?;
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        Ok(Archive { store: Arc::new(store), prefix, location: url.clone() })
    }

    /// An archive on any store (tests, benchmarks).
    pub fn on(store: Arc<dyn ObjectStore>, location: &str) -> Archive {
        Archive { store, prefix: String::new(), location: location.to_owned() }
    }

    fn path(&self, key: &str) -> Path {
        Path::from(format!("{}{key}", self.prefix))
    }

    /// Uploads a local file as `key`, streaming it in chunks; returns its size and SHA-256.
    pub async fn upload_file(
        &self,
        key: &str,
        local: &std::path::Path,
    ) -> Result<(u64, String), ArchiveError> {
        let store_error = |e| ArchiveError::Store { key: key.to_owned(), source: e };
        let mut file = tokio::fs::File::open(local).await.map_err(ArchiveError::Spool)?;
        let upload = self.store.put_multipart(&self.path(key)).await.map_err(store_error)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, CHUNK);
        let mut hash = Sha256::new();
        let mut size = 0u64;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer).await.map_err(ArchiveError::Spool)?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(4).await.map_err(store_error)?;
            writer.write(&buffer[..n]);
            hash.update(&buffer[..n]);
            size += n as u64;
        }
        writer.finish().await.map_err(store_error)?;
        Ok((size, hex::encode(hash.finalize())))
    }

    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArchiveError> {
        self.store
            .put(&self.path(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| ArchiveError::Store { key: key.to_owned(), source: e })
    }

    /// Removes one object (a single DELETE; absent is fine).
    pub async fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(ArchiveError::Store { key: key.to_owned(), source: e }),
        }
    }

    /// The object, or None when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError> {
        match self.store.get(&self.path(key)).await {
            Ok(result) => result
                .bytes()
                .await
                .map(Some)
                .map_err(|e| ArchiveError::Store { key: key.to_owned(), source: e }),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(ArchiveError::Store { key: key.to_owned(), source: e }),
        }
    }

    /// Downloads `key` into a local file, returning its size and SHA-256 (bounded memory).
    pub async fn download(&self, key: &str, local: &std::path::Path) -> Result<(u64, String), ArchiveError> {
        use tokio::io::AsyncWriteExt;
        let store_error = |e| ArchiveError::Store { key: key.to_owned(), source: e };
        let mut stream = self.store.get(&self.path(key)).await.map_err(store_error)?.into_stream();
        let mut file = tokio::fs::File::create(local).await.map_err(ArchiveError::Spool)?;
        let mut hash = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.try_next().await.map_err(store_error)? {
            hash.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(ArchiveError::Spool)?;
        }
        file.flush().await.map_err(ArchiveError::Spool)?;
        Ok((size, hex::encode(hash.finalize())))
    }

    /// The store and the full path of `key`, for a reader that fetches byte ranges on demand
    /// (`read::ArchiveFile`).
    pub fn object(&self, key: &str) -> (Arc<dyn ObjectStore>, Path) {
        (self.store.clone(), self.path(key))
    }

    /// The objects under `key_prefix`, keys relative to the archive's root.
    pub async fn list(&self, key_prefix: &str) -> Result<Vec<(String, ObjectMeta)>, ArchiveError> {
        let prefix = self.path(key_prefix);
        let objects: Vec<ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| ArchiveError::Store { key: key_prefix.to_owned(), source: e })?;
        Ok(objects
            .into_iter()
            .map(|o| (o.location.to_string().trim_start_matches(&self.prefix).to_owned(), o))
            .collect())
    }
}
