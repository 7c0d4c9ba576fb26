//! A value loaded from ClickHouse and replaced wholesale by a background reload: readers take an
//! `Arc` of the current version without waiting for writers. Until the first load succeeds the
//! snapshot reports not loaded, so a service can refuse work rather than use an empty value.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
pub struct Snapshot<T> {
    value: RwLock<Arc<T>>,
    loaded: AtomicBool,
}

impl<T> Snapshot<T> {
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.value.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn replace(&self, value: T) {
        *self.value.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
        self.loaded.store(true, Ordering::Release);
    }

    /// Has at least one load succeeded?
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }
}

/// Reloads `snapshot` with `load` now and every `interval` until `shutdown`; a failed load keeps
/// the previous value and is logged with `what`.
pub fn spawn_reloader<T, E, F, Fut>(
    snapshot: Arc<Snapshot<T>>,
    what: &'static str,
    interval: Duration,
    shutdown: CancellationToken,
    load: F,
) -> tokio::task::JoinHandle<()>
where
    T: Send + Sync + 'static,
    E: std::fmt::Display,
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, E>> + Send,
{
    crate::server::spawn_every(interval, shutdown, move || {
        let (snapshot, loading) = (Arc::clone(&snapshot), load());
        async move {
            match loading.await {
                Ok(value) => snapshot.replace(value),
                Err(error) => {
                    tracing::warn!(error = %error, what, "reload failed, keeping the previous value")
                }
            }
        }
    })
}
