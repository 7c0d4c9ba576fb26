//! Retrying what must eventually succeed: a ClickHouse query the loop cannot go on without (the
//! exactly-once checks, an insert). Capped exponential backoff, cut short by shutdown.

use std::fmt::Display;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

const FIRST: Duration = Duration::from_millis(100);
/// At most a second between tries: once ClickHouse answers again the consumer is back within
/// about a second (the recovery target is 3 s after ClickHouse answers; a 5 s cap measured 3.6 and
/// 4.1 s after a 60 s outage in `make chaos-long`). A failed try costs one refused connection.
const CAP: Duration = Duration::from_secs(1);

/// Capped exponential backoff between tries.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: FIRST }
    }
}

impl Backoff {
    /// Logs the failure and sleeps; false when shutdown came first.
    pub async fn wait(
        &mut self,
        shutdown: &CancellationToken,
        what: &str,
        error: &(dyn Display + Sync),
    ) -> bool {
        tracing::warn!(error = %error, what, backoff_ms = self.next.as_millis() as u64, "query failed, retrying");
        let slept = tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(self.next) => true,
        };
        self.next = (self.next * 2).min(CAP);
        slept
    }
}

/// Runs `attempt` on `state` until it returns `Ok`, waiting on `backoff` between tries; `None`
/// when shutdown came first. The attempt borrows `state` anew on each try (a boxed future, so the
/// loop stays `Send` whatever the attempt borrows).
pub async fn until_ok<S, T, E: Display + Sync>(
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
    what: &str,
    state: &mut S,
    mut attempt: impl for<'s> FnMut(&'s mut S) -> BoxFuture<'s, Result<T, E>>,
) -> Option<T> {
    loop {
        match attempt(state).await {
            Ok(value) => return Some(value),
            Err(error) => {
                if !backoff.wait(shutdown, what, &error).await {
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_with_growing_waits() {
        let mut tries = 0;
        let started = tokio::time::Instant::now();
        let value =
            until_ok(&mut Backoff::default(), &CancellationToken::new(), "test", &mut tries, |tries| {
                Box::pin(async move {
                    *tries += 1;
                    if *tries < 4 {
                        Err("not yet")
                    } else {
                        Ok(*tries)
                    }
                })
            })
            .await;
        assert_eq!(value, Some(4));
        // 100 + 200 + 400 ms of backoff.
        assert_eq!(started.elapsed(), Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_capped_and_shutdown_ends_it() {
        let mut backoff = Backoff::default();
        let shutdown = CancellationToken::new();
        for _ in 0..10 {
            assert!(backoff.wait(&shutdown, "test", &"error").await);
        }
        assert_eq!(backoff.next, CAP);
        shutdown.cancel();
        let gave_up =
            until_ok(&mut backoff, &shutdown, "test", &mut (), |_| Box::pin(async { Err::<(), _>("down") }))
                .await;
        assert_eq!(gave_up, None);
    }
}
