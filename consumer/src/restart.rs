//! Inserts ClickHouse acknowledged and then lost in a restart, stored again.
//!
//! A confirmed insert is not always on ClickHouse's disk for good: a server that loses power loses
//! the parts it had not yet synced (`fsync_after_insert` is off by default), and 18.16 (the local
//! stack's) confirms an insert whose part's `columns.txt` or `checksums.txt` could not be written
//! on a full disk — the error is swallowed where the file is closed — and then deletes that part
//! as broken at its next start. The consumer had committed those records: without more, their rows
//! are gone from `events` while the rollups, whose parts survived, still count them. `make chaos`
//! most likely caught it (a full disk, then ClickHouse killed: 155 events answered 202 missing
//! from `events`, still counted by the rollups); the mechanism is reproduced by hand on a small tmpfs.
//!
//! So the consumer watches when the server started (`now() - uptime()`, checked between batches
//! at most once a second). When it changed, or when this replica first sees a server that started
//! less than the re-read window ago (the consumer may have restarted with it), every assigned
//! partition is read again from its first record produced `TALLY_RESTART_REREAD_SECONDS` (default
//! 120) before the server started. The re-read goes through reconciliation like any re-delivery:
//! rows ClickHouse holds are skipped, the missing ones inserted. The rollups may still count what
//! `events` lost (their parts survived), or have lost what `events` kept, so once the re-read is
//! over every (org, hour) and (org, day) bucket holding a re-read row is compared whole with
//! `events` and rebuilt where it differs (`views::settle`).
//!
//! On a cluster the check is off: a replica that loses a part fetches it again from another
//! replica of its shard (inserts wait for a quorum of two).

use std::time::{Duration, Instant};

/// How often the server's start is checked, at most.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// `now() - uptime()` moves by up to a second between queries (both are whole seconds).
const JITTER_S: i64 = 2;

/// What is known of the server's start.
pub struct RestartWatch {
    window_s: i64,
    started: Option<i64>,
    /// What `started` was before the last restart seen, until its re-read is under way.
    before: Option<i64>,
    checked: Option<Instant>,
}

impl RestartWatch {
    /// `window`: how far before the server's start to read again; zero turns the watch off.
    pub fn new(window: Duration) -> Self {
        RestartWatch {
            window_s: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
            started: None,
            before: None,
            checked: None,
        }
    }

    /// Whether it is time to ask the server when it started.
    pub fn due(&self) -> bool {
        self.window_s > 0 && self.checked.is_none_or(|at| at.elapsed() >= CHECK_EVERY)
    }

    /// Takes in the server's start (epoch seconds) seen at `now_s`; returns the Kafka timestamp
    /// (epoch milliseconds) to read again from, when the server restarted.
    pub fn observe(&mut self, started_s: i64, now_s: i64) -> Option<i64> {
        self.checked = Some(Instant::now());
        let restarted = match self.started {
            Some(known) => started_s > known + JITTER_S,
            None => now_s - started_s < self.window_s,
        };
        if self.started.is_none() || restarted {
            self.before = self.started;
            self.started = Some(started_s);
        }
        restarted.then(|| (started_s - self.window_s).saturating_mul(1000))
    }

    /// Whether the re-read the last `observe` asked for is for a server this replica had not seen
    /// before (it may have restarted with it), not for a restart it saw.
    pub fn first_sight(&self) -> bool {
        self.before.is_none()
    }

    /// The check could not be made (ClickHouse not answering): tried again a second later.
    pub fn missed(&mut self) {
        self.checked = Some(Instant::now());
    }

    /// The re-read asked for by the last `observe` could not start (Kafka not answering): the
    /// restart is seen again at the next check.
    pub fn failed(&mut self) {
        self.started = self.before;
    }

    /// Off for good (a cluster: see the module's comment).
    pub fn turn_off(&mut self) {
        self.window_s = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_start_of_the_server_asks_for_the_window_before_it() {
        let mut watch = RestartWatch::new(Duration::from_secs(120));
        // First sight of a server up for an hour: nothing to read again.
        assert_eq!(watch.observe(1_000_000, 1_003_600), None);
        // The same start, seen a second off (whole-second rounding): still nothing.
        assert_eq!(watch.observe(1_000_001, 1_003_700), None);
        assert_eq!(watch.observe(1_000_000, 1_003_800), None);
        // Restarted: from 120 s before the new start.
        assert_eq!(watch.observe(1_003_900, 1_003_905), Some((1_003_900 - 120) * 1000));
        assert!(!watch.first_sight());
        // And only once.
        assert_eq!(watch.observe(1_003_900, 1_003_906), None);
        // Unless its re-read could not start: then it is seen again.
        assert_eq!(watch.observe(1_010_000, 1_010_001), Some((1_010_000 - 120) * 1000));
        watch.failed();
        assert_eq!(watch.observe(1_010_000, 1_010_002), Some((1_010_000 - 120) * 1000));
    }

    #[test]
    fn a_server_first_seen_within_the_window_of_its_start_is_read_again_from_before_it() {
        // The consumer may have restarted with ClickHouse: what it committed before is unchecked.
        let mut watch = RestartWatch::new(Duration::from_secs(120));
        assert_eq!(watch.observe(5_000, 5_030), Some((5_000 - 120) * 1000));
        assert!(watch.first_sight());
        assert_eq!(watch.observe(5_000, 5_031), None);
    }

    #[test]
    fn a_zero_window_turns_the_watch_off_and_checks_are_spaced() {
        assert!(!RestartWatch::new(Duration::ZERO).due());
        let mut watch = RestartWatch::new(Duration::from_secs(60));
        assert!(watch.due());
        watch.missed();
        assert!(!watch.due(), "at most one check a second");
    }
}
