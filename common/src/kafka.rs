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
//! forgotten server is added and connected to), and again after twice as long each time while
//! nothing answers (up to `RESEED_AFTER_MAX`). During a real outage that costs a log line and a
//! spare connection attempt each time, removed by the brokers' next metadata answer.

use std::ffi::CString;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::client::{Client, ClientContext};
use tokio_util::sync::CancellationToken;

/// How long no broker may answer before the bootstrap servers are given again.
pub const RESEED_AFTER: Duration = Duration::from_secs(10);

/// While nothing answers, each later time waits twice as long, up to this. (During an outage a
/// client that still knows its brokers gets one more connection each time, which the brokers'
/// next metadata answer removes again: a handful per outage, not one every 10 s.)
pub const RESEED_AFTER_MAX: Duration = Duration::from_secs(300);

/// How often `spawn_guard` asks for metadata.
pub const PROBE_EVERY: Duration = Duration::from_secs(3);

/// The bootstrap servers of one client and how long its brokers have been silent.
pub struct BootstrapGuard {
    what: &'static str,
    brokers: CString,
    unreachable_since: Option<Instant>,
    /// How long the current silence must last for the next time.
    wait: Duration,
}

impl BootstrapGuard {
    /// `what` names the client in the log; `brokers` is its `bootstrap.servers`.
    pub fn new(what: &'static str, brokers: &str) -> Self {
        BootstrapGuard {
            what,
            brokers: CString::new(brokers).unwrap_or_default(),
            unreachable_since: None,
            wait: RESEED_AFTER,
        }
    }

    /// After each metadata request of `client`: `answered` is whether a broker answered it.
    pub fn observe<C: ClientContext>(&mut self, client: &Client<C>, answered: bool) {
        if self.observe_at(Instant::now(), answered) {
            let added = self.reseed(client);
            tracing::warn!(
                client = self.what,
                servers = added,
                "no Kafka broker answered for a while: gave the client its bootstrap servers again"
            );
        }
    }

    /// The rule, without the client: true when the servers are due again at `now`.
    fn observe_at(&mut self, now: Instant, answered: bool) -> bool {
        if answered {
            self.unreachable_since = None;
            self.wait = RESEED_AFTER;
            return false;
        }
        let since = *self.unreachable_since.get_or_insert(now);
        if now.duration_since(since) < self.wait {
            return false;
        }
        self.unreachable_since = Some(now);
        self.wait = (self.wait * 2).min(RESEED_AFTER_MAX);
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
    fn the_servers_are_given_again_after_ten_silent_seconds_then_ever_less_often() {
        let mut guard = BootstrapGuard::new("test", "127.0.0.1:9092");
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(!guard.observe_at(at(0), false), "the first silence only starts the clock");
        assert!(!guard.observe_at(at(9), false));
        assert!(guard.observe_at(at(10), false), "ten silent seconds");
        assert!(!guard.observe_at(at(20), false), "then twenty");
        assert!(guard.observe_at(at(30), false));
        assert!(!guard.observe_at(at(69), false), "then forty");
        assert!(guard.observe_at(at(70), false));
        let times = (71..3_600).filter(|&s| guard.observe_at(at(s), false)).count();
        assert_eq!(times, 12, "80, 160, then every 300 s: a handful an hour");
        assert!(!guard.observe_at(at(3_600), true), "an answer resets the clock and the wait");
        assert!(!guard.observe_at(at(3_601), false));
        assert!(!guard.observe_at(at(3_610), false));
        assert!(guard.observe_at(at(3_611), false));
    }
}
