//! A guard every long-lived Kafka client of Tally needs against a librdkafka defect.
//!
//! Since 2.10, librdkafka forgets the brokers a metadata answer does not list. A KRaft broker that
//! is starting answers metadata while it is still fenced, listing no broker at all; the client then
//! forgets every broker, its bootstrap servers included, and never connects again (librdkafka
//! issue 5301, open for 2.12 and 2.13: "stops rebootstrap and clears brokers on 0 brokers but
//! topic>0 MetadataResponse"). `make chaos` met it after a broker restart: the ingest's producer
//! left with no broker (every request 503 for ever), the consumer's client waiting for ever for a
//! coordinator it could no longer reach (`dev/chaos.py --plan 10:consumer,10:kafka` replays it).
//!
//! The guard watches whether the brokers answer a client's metadata requests; when none answered
//! for `RESEED_AFTER`, it gives the client its bootstrap servers again (`rd_kafka_brokers_add`: a
//! broker the client still knows is left as it is, a forgotten one is added and connected to), and
//! again every `RESEED_AFTER` while nothing answers. During a real outage that costs nothing but a
//! log line: the servers are the ones the client already has.

use std::ffi::CString;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::client::{Client, ClientContext};
use tokio_util::sync::CancellationToken;

/// How long no broker may answer before the bootstrap servers are given again.
pub const RESEED_AFTER: Duration = Duration::from_secs(10);

/// How often `spawn_guard` asks for metadata.
pub const PROBE_EVERY: Duration = Duration::from_secs(3);

/// The bootstrap servers of one client and how long its brokers have been silent.
pub struct BootstrapGuard {
    what: &'static str,
    brokers: CString,
    unreachable_since: Option<Instant>,
}

impl BootstrapGuard {
    /// `what` names the client in the log; `brokers` is its `bootstrap.servers`.
    pub fn new(what: &'static str, brokers: &str) -> Self {
        BootstrapGuard { what, brokers: CString::new(brokers).unwrap_or_default(), unreachable_since: None }
    }

    /// After each metadata request of `client`: `answered` is whether a broker answered it.
    /// Returns whether the bootstrap servers were given again.
    pub fn observe<C: ClientContext>(&mut self, client: &Client<C>, answered: bool) -> bool {
        self.observe_at(Instant::now(), answered) && {
            let added = self.reseed(client);
            tracing::warn!(
                client = self.what,
                servers = added,
                "no Kafka broker answered for {} s: gave the client its bootstrap servers again",
                RESEED_AFTER.as_secs()
            );
            true
        }
    }

    /// The rule, without the client: true when the servers are due again at `now`.
    fn observe_at(&mut self, now: Instant, answered: bool) -> bool {
        if answered {
            self.unreachable_since = None;
            return false;
        }
        let since = *self.unreachable_since.get_or_insert(now);
        if now.duration_since(since) < RESEED_AFTER {
            return false;
        }
        self.unreachable_since = Some(now);
        true
    }

    /// Gives `client` the bootstrap servers now (`rd_kafka_brokers_add`, which librdkafka offers
    /// no safe binding for; a server the client knows is not added twice). Returns how many
    /// servers of the list librdkafka accepted.
    #[allow(unsafe_code)]
    pub fn reseed<C: ClientContext>(&self, client: &Client<C>) -> i32 {
        // SAFETY: `native_ptr` is the live handle `client` owns, valid while it is borrowed here;
        // librdkafka copies the NUL-terminated list and may be called from any thread.
        unsafe { rdkafka::bindings::rd_kafka_brokers_add(client.native_ptr(), self.brokers.as_ptr()) }
    }
}

/// Guards a client that has no probe of its own: every `PROBE_EVERY`, asks for `topic`'s metadata
/// (on the blocking pool: librdkafka's call blocks) and applies the guard, until `shutdown`.
/// `client_of` reaches the client inside `holder` (a producer or a consumer).
pub fn spawn_guard<H, C>(
    what: &'static str,
    holder: Arc<H>,
    client_of: fn(&H) -> &Client<C>,
    brokers: &str,
    topic: &str,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()>
where
    H: Send + Sync + 'static,
    C: ClientContext + 'static,
{
    let guard = Arc::new(Mutex::new(BootstrapGuard::new(what, brokers)));
    let topic = topic.to_owned();
    crate::server::spawn_every(PROBE_EVERY, shutdown, move || {
        let (holder, guard, topic) = (Arc::clone(&holder), Arc::clone(&guard), topic.clone());
        async move {
            let _ = tokio::task::spawn_blocking(move || {
                let client = client_of(&holder);
                let answered = client.fetch_metadata(Some(&topic), Duration::from_secs(2)).is_ok();
                guard.lock().unwrap_or_else(PoisonError::into_inner).observe(client, answered);
            })
            .await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_are_given_again_after_ten_silent_seconds_and_every_ten_while_silent() {
        let mut guard = BootstrapGuard::new("test", "127.0.0.1:9092");
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(!guard.observe_at(at(0), false), "the first silence only starts the clock");
        assert!(!guard.observe_at(at(9), false));
        assert!(guard.observe_at(at(10), false), "ten silent seconds");
        assert!(!guard.observe_at(at(15), false), "not again at once");
        assert!(guard.observe_at(at(20), false), "again ten seconds later");
        assert!(!guard.observe_at(at(21), true), "an answer resets the clock");
        assert!(!guard.observe_at(at(22), false));
        assert!(!guard.observe_at(at(31), false));
        assert!(guard.observe_at(at(32), false));
    }
}
