//! Per-org plan limits, counted in events (not requests), with governor's GCRA.
//!
//! Across replicas: each ingest replica enforces `1/N` of every org's limit and burst, where N is
//! `TALLY_INGEST_REPLICAS`. With a load balancer that spreads requests evenly (round robin or
//! least-connections, as Kubernetes services do), the org-wide rate converges on the plan's limit
//! without any coordination or round trip on the hot path. The response headers report org-wide
//! figures: this replica's share multiplied by N.
//!
//! A batch that only partly fits is admitted as its longest fitting prefix: those events are
//! accepted, the rest are answered as rejected with reason `rate_limited` (the client retries them
//! after `Retry-After`). They are not dead-lettered: nothing is wrong with them.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tally_common::keyset::OrgInfo;

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

struct OrgLimiter {
    per_minute: u32,
    burst: u32,
    limiter: Arc<Limiter>,
}

/// The outcome of admitting a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// How many events of the batch (a prefix) may go through.
    pub allowed: u32,
    /// Org-wide events per minute.
    pub limit: u32,
    /// Org-wide events that could still be sent right now.
    pub remaining: u32,
    /// When the org's burst capacity is full again.
    pub reset_after: Duration,
    /// When nothing was allowed: how long until the next event would be.
    pub retry_after: Option<Duration>,
}

pub struct OrgLimits {
    replicas: u32,
    /// Keyed by org id (server-made, never from a request body): a fast non-keyed hash.
    by_org: RwLock<HashMap<Arc<str>, OrgLimiter, rustc_hash::FxBuildHasher>>,
}

fn share(value: u32, replicas: u32) -> NonZeroU32 {
    NonZeroU32::new(value.div_ceil(replicas).max(1)).unwrap_or(NonZeroU32::MIN)
}

impl OrgLimits {
    pub fn new(replicas: u32) -> Self {
        OrgLimits { replicas: replicas.max(1), by_org: RwLock::new(HashMap::default()) }
    }

    /// The limiter for the org's current plan; replaced when the plan or override changes.
    fn limiter(&self, org: &OrgInfo) -> Arc<Limiter> {
        let burst = if org.burst > 0 { org.burst } else { org.events_per_minute };
        if let Some(entry) = self.by_org.read().unwrap_or_else(|e| e.into_inner()).get(&org.org_id) {
            if entry.per_minute == org.events_per_minute && entry.burst == burst {
                return Arc::clone(&entry.limiter);
            }
        }
        let quota = Quota::per_minute(share(org.events_per_minute, self.replicas))
            .allow_burst(share(burst, self.replicas));
        let limiter = Arc::new(RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>());
        let entry = OrgLimiter { per_minute: org.events_per_minute, burst, limiter: Arc::clone(&limiter) };
        self.by_org.write().unwrap_or_else(|e| e.into_inner()).insert(Arc::clone(&org.org_id), entry);
        limiter
    }

    /// Admits the longest prefix of `wanted` events that fits the org's limit right now.
    pub fn admit(&self, org: &OrgInfo, wanted: u32) -> Admission {
        let limiter = self.limiter(org);
        let per_event = Duration::from_secs(60) / share(org.events_per_minute, self.replicas).get();
        let burst_share =
            share(if org.burst > 0 { org.burst } else { org.events_per_minute }, self.replicas).get();
        let mut allowed = 0u32;
        let mut remaining_share: Option<u32> = None;
        let mut denied_until: Option<Duration> = None;
        // Greedy halving: each successful check consumes its cells, a failed one consumes nothing,
        // so this admits the longest fitting prefix in O(log n) checks.
        let mut step = wanted;
        while allowed < wanted && step > 0 {
            let cells = NonZeroU32::new(step).unwrap_or(NonZeroU32::MIN);
            match limiter.check_n(cells) {
                Ok(Ok(snapshot)) => {
                    allowed += step;
                    remaining_share = Some(snapshot.remaining_burst_capacity());
                    step = step.min(wanted - allowed);
                }
                Ok(Err(not_until)) => {
                    // The last denial is for the smallest step: when at least one event will fit.
                    denied_until = Some(not_until.wait_time_from(limiter.clock().now()));
                    step /= 2;
                }
                Err(governor::InsufficientCapacity(capacity)) => step = capacity.min(step / 2),
            }
        }
        let remaining_share = match remaining_share {
            Some(remaining) => remaining,
            None if wanted == 0 => burst_share,
            None => 0,
        };
        let replicas = self.replicas;
        Admission {
            allowed,
            limit: org.events_per_minute,
            remaining: remaining_share.saturating_mul(replicas),
            reset_after: per_event * burst_share.saturating_sub(remaining_share),
            retry_after: if allowed == 0 && wanted > 0 {
                Some(denied_until.unwrap_or(per_event).max(Duration::from_millis(1)))
            } else {
                None
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use tally_schemas::plan::Plan;

    use super::*;

    fn org(per_minute: u32, burst: u32) -> OrgInfo {
        OrgInfo {
            org_id: Arc::from("org"),
            name: "org".into(),
            plan: Plan::Free,
            events_per_minute: per_minute,
            burst,
        }
    }

    #[test]
    fn admits_the_fitting_prefix_then_refuses() {
        let limits = OrgLimits::new(1);
        let free = org(100, 0);
        let first = limits.admit(&free, 60);
        assert_eq!((first.allowed, first.limit, first.remaining), (60, 100, 40));
        assert!(first.retry_after.is_none());
        let second = limits.admit(&free, 60);
        assert_eq!(second.allowed, 40, "the fitting prefix");
        assert_eq!(second.remaining, 0);
        let third = limits.admit(&free, 10);
        assert_eq!(third.allowed, 0);
        let wait = third.retry_after.expect("a retry delay");
        assert!(wait > Duration::from_millis(100) && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(third.reset_after >= Duration::from_secs(59));
    }

    #[test]
    fn batches_larger_than_the_burst_are_split() {
        let limits = OrgLimits::new(1);
        let admitted = limits.admit(&org(100, 30), 1000);
        assert_eq!(admitted.allowed, 30);
    }

    #[test]
    fn each_replica_enforces_its_share_and_reports_org_figures() {
        let limits = OrgLimits::new(2);
        let admitted = limits.admit(&org(1000, 0), 2000);
        assert_eq!(admitted.allowed, 500);
        assert_eq!(admitted.limit, 1000);
        assert_eq!(admitted.remaining, 0);
        let fresh = OrgLimits::new(2).admit(&org(1000, 0), 100);
        assert_eq!(fresh.remaining, 800, "(500 - 100) × 2 replicas");
    }

    #[test]
    fn plan_changes_take_effect() {
        let limits = OrgLimits::new(1);
        assert_eq!(limits.admit(&org(10, 0), 50).allowed, 10);
        assert_eq!(limits.admit(&org(10_000, 0), 50).allowed, 50, "upgraded plan, fresh limiter");
    }
}
