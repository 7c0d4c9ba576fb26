//! Duplicate removal by event id. A client that retries a request (same `eventId`, or the same
//! `Idempotency-Key`, from which the ingest derives the same ids) sends events that are new Kafka
//! records: the exactly-once reconciliation, which works on Kafka positions, cannot see them.
//!
//! Rule: a row whose (org_id, event_id) was already stored with a `received_at` within the
//! window (default 24 h, `TALLY_DEDUP_WINDOW_HOURS`; old ids are let go once an hour, so an id is
//! remembered between `window` and `window + 1` hours) is dropped; the first one stored wins.
//!
//! Memory is bounded: the window holds at most `TALLY_DEDUP_MAX_IDS` ids per replica (default
//! 10 million, at most ~210 MB). A replica that receives more within the window (10 million ids in
//! 24 h is 116 events/s) forgets its oldest arrivals, two minutes of arrivals at a time, down to
//! 7/8 of the bound: the window it really remembers is shorter than configured, which the replica
//! logs and exports (`tally_consumer_dedup_window_seconds`, `tally_consumer_dedup_evicted_total`)
//! instead of growing until the kernel kills it. Retries arriving after that shorter window are
//! stored again; Kafka-position reconciliation (the exactly-once path) does not depend on it.
//!
//! How: the ingest keys every record by org, so all of an org's events are in one partition and
//! the owner of that partition sees all of them. Per partition the consumer keeps an in-memory
//! table of 64-bit entries, a 48-bit fingerprint of (org_id, event_id) and the 16-bit two-minute
//! slot it arrived in, in an open-addressing table (about 10 to 21 bytes per id). A row whose fingerprint is
//! absent is new: the common case costs one hash and one probe, no query. A row whose fingerprint
//! is present is only a candidate: one query per batch confirms candidates against ClickHouse, so
//! a fingerprint collision can never drop an event. Rows repeated inside one batch are compared
//! exactly. The table is rebuilt from ClickHouse after every rebalance (a previous owner may have
//! written), with one query over the assigned partitions and the window.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher};

use foldhash::fast::FixedState;

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

use crate::batch::{BatchContext, Pending, Row, Stage};
use crate::store::{ClickHouseError, EventStore};

const FINGERPRINT_BITS: u32 = 48;
const FINGERPRINT_MASK: u64 = (1 << FINGERPRINT_BITS) - 1;

/// The 48-bit fingerprint of an (org, event id) pair. Deterministic within a process, which is all
/// the table needs: it is rebuilt by this process from ClickHouse, never persisted.
pub fn fingerprint(org_id: &str, event_id: &uuid::Uuid) -> u64 {
    let mut hasher = FixedState::with_seed(0x7461_6c6c_7964_6564).build_hasher();
    org_id.hash(&mut hasher);
    event_id.as_u128().hash(&mut hasher);
    hasher.finish() & FINGERPRINT_MASK
}

type FastMap<K, V> = HashMap<K, V, FixedState>;
type FastSet<K> = HashSet<K, FixedState>;
/// Rows of a batch, as (record, index in the record).
type Positions = FastSet<(usize, usize)>;
/// Rows kept, as (partition, fingerprint, arrival epoch seconds).
type Kept = Vec<(i32, u64, u32)>;

/// The table's hash of an entry: the fingerprint spread over 64 bits (the table uses the top bits).
fn spread(fingerprint: u64) -> u64 {
    fingerprint.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The arrival slot an id is tagged with: two minutes, the step in which the oldest ids are
/// forgotten when the window outgrows its bound. Tags wrap every 65 536 slots (91 days).
const SLOT_SECONDS: u32 = 120;
const SLOTS_PER_HOUR: u16 = 30;

fn slot_tag(epoch_seconds: u32) -> u16 {
    (epoch_seconds / SLOT_SECONDS) as u16
}

/// Whole slots from `tag` to `now`, 0 for a tag in the future (clock skew between ingest and
/// consumer). Windows (at most 720 h, 21 600 slots) are far shorter than the wrap.
fn age_slots(now: u16, tag: u16) -> u16 {
    u16::try_from(now.wrapping_sub(tag) as i16).unwrap_or(0)
}

fn tag_of(entry: u64) -> u16 {
    (entry >> FINGERPRINT_BITS) as u16
}

/// The ids of one partition seen within the window.
#[derive(Default)]
pub struct IdWindow {
    entries: HashTable<u64>,
}

impl IdWindow {
    pub fn contains(&self, fingerprint: u64) -> bool {
        self.entries.find(spread(fingerprint), |e| e & FINGERPRINT_MASK == fingerprint).is_some()
    }

    /// Remembers `fingerprint` as arrived at `received_at` (epoch seconds); the later arrival wins.
    pub fn insert(&mut self, fingerprint: u64, received_at: u32) {
        let tag = slot_tag(received_at);
        let entry = fingerprint | (u64::from(tag) << FINGERPRINT_BITS);
        // One probe for both outcomes (a lookup, then an insert, probed twice per new id).
        match self.entries.entry(
            spread(fingerprint),
            |e| e & FINGERPRINT_MASK == fingerprint,
            |e| spread(e & FINGERPRINT_MASK),
        ) {
            Entry::Occupied(mut existing) => {
                let existing = existing.get_mut();
                if age_slots(tag, tag_of(*existing)) > 0 {
                    *existing = entry;
                }
            }
            Entry::Vacant(vacant) => {
                vacant.insert(entry);
            }
        }
    }

    /// Forgets ids that arrived `window_hours` or more before `now` (epoch seconds).
    pub fn expire(&mut self, now: u32, window_hours: u16) {
        self.forget_from(slot_tag(now), window_hours * SLOTS_PER_HOUR);
        self.entries.shrink_to_fit(|e| spread(*e & FINGERPRINT_MASK));
    }

    /// Forgets ids `max_age` or more slots old at slot `now`.
    fn forget_from(&mut self, now: u16, max_age: u16) {
        self.entries.retain(|e| age_slots(now, tag_of(*e)) < max_age);
    }

    /// Adds to `counts[age]` the ids `age` slots old at slot `now` (older ones in the last).
    fn count_ages(&self, now: u16, counts: &mut [usize]) {
        let last = counts.len() - 1;
        for entry in &self.entries {
            counts[usize::from(age_slots(now, tag_of(*entry))).min(last)] += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Heap bytes held: one 8-byte slot and one control byte per bucket (buckets are a power of
    /// two at most 7/8 full).
    pub fn heap_bytes(&self) -> usize {
        let capacity = self.entries.capacity();
        if capacity == 0 {
            return 0;
        }
        let buckets = (capacity * 8 / 7).next_power_of_two();
        buckets * 9 + 16
    }
}

/// What one pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Rows dropped because the same id was already stored or appeared earlier in the batch.
    pub duplicates: usize,
    /// Fingerprint hits confirmed or refuted by a query.
    pub confirmed: usize,
    /// Rows loaded into the tables by a rebuild.
    pub rebuilt: usize,
}

/// The bound on the ids a replica's window holds, over all its partitions.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    max_ids: usize,
    window_slots: u16,
}

/// What keeping the window within its bound did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eviction {
    /// Ids forgotten before their window ended.
    pub ids: usize,
    /// Every id that arrived from this time on (epoch seconds) is still remembered.
    pub remembered_since: u32,
}

impl Budget {
    pub fn new(max_ids: usize, window_hours: u16) -> Self {
        Budget { max_ids, window_slots: window_hours.saturating_mul(SLOTS_PER_HOUR) }
    }

    /// What an eviction leaves: 7/8 of the bound.
    fn target(&self) -> usize {
        self.max_ids - self.max_ids / 8
    }

    /// When `windows` hold more than the bound: forgets their oldest slots of arrivals until they
    /// hold at most 7/8 of it (so that the pass, which reads every entry twice, is not repeated at
    /// every batch). None while within the bound.
    fn enforce(&self, windows: &mut [&mut IdWindow], now: u32) -> Option<Eviction> {
        let held: usize = windows.iter().map(|w| w.len()).sum();
        if held <= self.max_ids {
            return None;
        }
        let target = self.target();
        let now_tag = slot_tag(now);
        // Ages 0..=window_slots, then everything older (not expired yet) in the last count.
        let mut counts = vec![0usize; usize::from(self.window_slots) + 2];
        for window in windows.iter() {
            window.count_ages(now_tag, &mut counts);
        }
        let (mut kept, mut max_age) = (0usize, 0u16);
        for count in &counts {
            if kept + count > target {
                break;
            }
            kept += count;
            max_age += 1;
        }
        for window in windows.iter_mut() {
            window.forget_from(now_tag, max_age);
        }
        let remembered_since = (now / SLOT_SECONDS + 1).saturating_sub(u32::from(max_age)) * SLOT_SECONDS;
        Some(Eviction { ids: held - kept, remembered_since })
    }

    /// For a rebuild: given the ids to load counted by slot (start, epoch seconds) and the ids
    /// `held` already, the arrival time from which the newest slots fit 7/8 of the bound, with
    /// the ids left out; None when all of them fit the bound.
    fn newest_that_fit(&self, slots: &BTreeMap<u32, u64>, held: usize) -> Option<Eviction> {
        let total = held as u64 + slots.values().sum::<u64>();
        if total <= self.max_ids as u64 {
            return None;
        }
        let room = self.target().saturating_sub(held) as u64;
        let mut kept = 0u64;
        let mut remembered_since = slots.keys().next_back().map_or(0, |newest| newest + SLOT_SECONDS);
        for (&slot, &ids) in slots.iter().rev() {
            if kept + ids > room {
                break;
            }
            kept += ids;
            remembered_since = slot;
        }
        Some(Eviction { ids: (total - held as u64 - kept) as usize, remembered_since })
    }
}

/// Evictions not reported yet, and how far back the window still reaches after them.
#[derive(Debug, Default)]
struct Evicted {
    unreported: usize,
    /// None: the whole configured window is remembered.
    remembered_since: Option<u32>,
}

impl Evicted {
    fn note(&mut self, eviction: Option<Eviction>) {
        if let Some(eviction) = eviction {
            self.add(Evicted { unreported: eviction.ids, remembered_since: Some(eviction.remembered_since) });
        }
    }

    fn add(&mut self, other: Evicted) {
        self.unreported += other.unreported;
        self.remembered_since = self.remembered_since.max(other.remembered_since);
    }
}

pub struct Deduplicator {
    store: EventStore,
    window_hours: u16,
    budget: Budget,
    partitions: HashMap<i32, IdWindow>,
    expired_at_hour: u32,
    /// The rows the last `filter` kept, recorded once stored.
    kept: Kept,
    /// Counts resets: a check made ahead with the windows of an earlier epoch no longer holds.
    epoch: u64,
    evicted: Evicted,
}

impl Deduplicator {
    /// A window of `window_hours` holding at most `max_ids` ids.
    pub fn new(store: EventStore, window_hours: u16, max_ids: usize) -> Self {
        Deduplicator {
            store,
            window_hours,
            budget: Budget::new(max_ids, window_hours),
            partitions: HashMap::new(),
            expired_at_hour: 0,
            kept: Vec::new(),
            epoch: 0,
            evicted: Evicted::default(),
        }
    }

    /// Forgets everything: called after every rebalance, as another replica may have written.
    pub fn reset(&mut self) {
        self.partitions.clear();
        self.kept.clear();
        self.epoch += 1;
        self.evicted.remembered_since = None;
    }

    pub fn ids(&self) -> usize {
        self.partitions.values().map(IdWindow::len).sum()
    }

    pub fn heap_bytes(&self) -> usize {
        self.partitions.values().map(IdWindow::heap_bytes).sum()
    }

    /// Ids forgotten before their window ended since the last call (to keep within the bound).
    pub fn take_evicted(&mut self) -> usize {
        std::mem::take(&mut self.evicted.unreported)
    }

    /// How far back, in seconds from `now`, every arrival is remembered: the configured window,
    /// or less after the bound made the window forget its oldest ids.
    pub fn remembered_seconds(&self, now: u32) -> u32 {
        let configured = u32::from(self.window_hours) * 3600;
        self.evicted.remembered_since.map_or(configured, |since| now.saturating_sub(since).min(configured))
    }

    fn window_start(&self, now: u32) -> u32 {
        (now / 3600).saturating_sub(u32::from(self.window_hours)) * 3600
    }

    /// Loads the ids stored within the window for every partition of `partitions` not loaded yet,
    /// within the bound. The ids are counted by arrival slot first: when they outnumber what the
    /// bound leaves, only the newest slots that fit are loaded (a restart after a day at a high
    /// rate reads what it keeps, not the whole day); should more arrive meanwhile, the oldest loaded
    /// are forgotten as the rows stream.
    async fn rebuild(&mut self, partitions: &BTreeSet<i32>, now: u32) -> Result<usize, ClickHouseError> {
        let missing: Vec<i32> =
            partitions.iter().copied().filter(|p| !self.partitions.contains_key(p)).collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let mut since = self.window_start(now);
        let mut held = self.ids();
        let slots = self.store.ids_by_slot(&missing, since, SLOT_SECONDS).await?;
        if let Some(eviction) = self.budget.newest_that_fit(&slots, held) {
            since = eviction.remembered_since;
            self.evicted.note(Some(eviction));
        }
        // Filled aside and kept only once the whole query succeeded: a partition whose rebuild
        // failed half-way must not count as loaded (it would let duplicates through), so the
        // retry rebuilds it from scratch.
        let mut rebuilt: HashMap<i32, IdWindow> = missing.iter().map(|p| (*p, IdWindow::default())).collect();
        let mut loaded = 0;
        let Deduplicator { store, budget, partitions: loaded_before, evicted, .. } = self;
        store
            .for_each_id_since(&missing, since, |stored| {
                if evicted.remembered_since.is_some_and(|floor| stored.received_at < floor) {
                    return;
                }
                let Some(window) = rebuilt.get_mut(&i32::from(stored.kafka_partition)) else { return };
                window.insert(fingerprint(&stored.org_id, &stored.event_id), stored.received_at);
                loaded += 1;
                held += 1;
                if held > budget.max_ids {
                    let mut windows: Vec<&mut IdWindow> =
                        loaded_before.values_mut().chain(rebuilt.values_mut()).collect();
                    evicted.note(budget.enforce(&mut windows, now));
                    held = windows.iter().map(|w| w.len()).sum();
                }
            })
            .await?;
        self.partitions.extend(rebuilt);
        Ok(loaded)
    }

    /// Removes from `batch` every row whose id is already stored within the window, or repeated
    /// earlier in the batch. `assigned` are the partitions this replica owns (rebuilt together).
    pub async fn filter(
        &mut self,
        batch: &mut [Pending],
        assigned: &BTreeSet<i32>,
        now: u32,
    ) -> Result<Outcome, ClickHouseError> {
        let mut outcome = Outcome::default();
        let mut partitions: BTreeSet<i32> = batch.iter().map(|p| p.partition).collect();
        partitions.extend(assigned.iter().copied());
        outcome.rebuilt = self.rebuild(&partitions, now).await?;

        let (prints, candidates) = fingerprints(&self.partitions, batch);
        outcome.confirmed = candidates.len();
        let stored = if candidates.is_empty() {
            HashSet::new()
        } else {
            self.store.stored_ids(&candidates, self.window_start(now)).await?
        };
        let (drop, kept) = first_occurrences(batch, &prints, &stored);
        self.kept = kept;
        outcome.duplicates = drop.len();
        remove_rows(batch, &drop);
        Ok(outcome)
    }

    /// After a successful store: the ids the last `filter` kept count as stored. Expires old ids
    /// once an hour, and keeps the window within its bound.
    pub fn record_stored(&mut self, now: u32) {
        insert_ids(&mut self.partitions, self.kept.drain(..));
        if now / 3600 != self.expired_at_hour {
            self.expired_at_hour = now / 3600;
            for window in self.partitions.values_mut() {
                window.expire(now, self.window_hours);
            }
        }
        let mut windows: Vec<&mut IdWindow> = self.partitions.values_mut().collect();
        self.evicted.note(self.budget.enforce(&mut windows, now));
    }

    /// Lends the windows, with the ids of the batch about to be stored, to a thread that checks
    /// the next batch while this one is inserted (see `Lent::precheck`). `give_back` returns them;
    /// until then this deduplicator holds no ids.
    pub fn lend(&mut self) -> Lent {
        Lent {
            partitions: std::mem::take(&mut self.partitions),
            recorded: std::mem::take(&mut self.kept),
            epoch: self.epoch,
            budget: self.budget,
            evicted: Evicted::default(),
        }
    }

    pub fn give_back(&mut self, lent: Lent) {
        self.partitions = lent.partitions;
        self.evicted.add(lent.evicted);
    }

    /// Applies a check made ahead, if it still holds: no rebalance since (the windows it saw were
    /// not reset) and no earlier stage removed anything from the batch (its row positions are the
    /// ones checked). None when `filter` must run instead.
    pub fn apply_prechecked(&mut self, batch: &mut [Pending], prechecked: Prechecked) -> Option<Outcome> {
        if prechecked.epoch != self.epoch || prechecked.shape != shape(batch) {
            return None;
        }
        remove_rows(batch, &prechecked.drop);
        self.kept = prechecked.kept;
        Some(Outcome { duplicates: prechecked.drop.len(), ..Outcome::default() })
    }
}

/// The windows lent out while a batch is inserted, with that batch's kept ids.
pub struct Lent {
    partitions: HashMap<i32, IdWindow>,
    recorded: Kept,
    epoch: u64,
    budget: Budget,
    /// What keeping the windows within their bound did while lent.
    evicted: Evicted,
}

/// The outcome of `Lent::precheck` for a batch none of whose ids the window held.
pub struct Prechecked {
    epoch: u64,
    shape: (usize, usize),
    drop: Positions,
    kept: Kept,
}

impl Lent {
    /// Records the ids of the batch being inserted, then checks `batch` (the next one) against the
    /// windows. Recording before that insert is confirmed is safe: a window hit only makes a row a
    /// candidate, which a query confirms against ClickHouse once the insert is done, so an id
    /// recorded for an insert that then fails costs a query, never an event. Returns None, and
    /// `filter` runs after the insert, when a row's id is a candidate (the confirming query must
    /// see that insert) or a partition's window is not loaded yet. Under a backlog this is where
    /// the windows are kept within their bound (`now`, epoch seconds), off the inserts' path.
    pub fn precheck(&mut self, batch: &[Pending], assigned: &BTreeSet<i32>, now: u32) -> Option<Prechecked> {
        insert_ids(&mut self.partitions, self.recorded.drain(..));
        let mut windows: Vec<&mut IdWindow> = self.partitions.values_mut().collect();
        self.evicted.note(self.budget.enforce(&mut windows, now));
        let mut partitions = batch.iter().map(|p| &p.partition).chain(assigned);
        if !partitions.all(|p| self.partitions.contains_key(p)) {
            return None;
        }
        let (prints, candidates) = fingerprints(&self.partitions, batch);
        if !candidates.is_empty() {
            return None;
        }
        let (drop, kept) = first_occurrences(batch, &prints, &HashSet::new());
        Some(Prechecked { epoch: self.epoch, shape: shape(batch), drop, kept })
    }
}

/// Records and rows of a batch: the stages before dedup only remove, so an unchanged shape means
/// unchanged row positions.
fn shape(batch: &[Pending]) -> (usize, usize) {
    (batch.len(), batch.iter().map(Pending::row_count).sum())
}

/// Remembers the kept rows' ids in their partitions' windows.
fn insert_ids(partitions: &mut HashMap<i32, IdWindow>, kept: impl Iterator<Item = (i32, u64, u32)>) {
    // Rows come record by record, so a partition's rows run together: its window is looked up
    // once per run, not per row.
    let mut current: Option<(i32, Option<&mut IdWindow>)> = None;
    for (partition, print, received_at) in kept {
        if current.as_ref().is_none_or(|(p, _)| *p != partition) {
            current = Some((partition, partitions.get_mut(&partition)));
        }
        if let Some((_, Some(window))) = current.as_mut() {
            window.insert(print, received_at);
        }
    }
}

/// Each row's fingerprint, per record, and the rows whose fingerprint the windows hold.
fn fingerprints<'b>(
    partitions: &HashMap<i32, IdWindow>,
    batch: &'b [Pending],
) -> (Vec<Vec<u64>>, HashSet<(&'b str, uuid::Uuid)>) {
    let mut prints: Vec<Vec<u64>> = Vec::with_capacity(batch.len());
    let mut candidates: HashSet<(&str, uuid::Uuid)> = HashSet::new();
    for pending in batch {
        let rows = pending.decoded.as_ref().map_or(&[][..], Vec::as_slice);
        let window = partitions.get(&pending.partition);
        prints.push(
            rows.iter()
                .map(|row| {
                    let print = fingerprint(&row.org_id, &row.event_id);
                    if window.is_some_and(|w| w.contains(print)) {
                        candidates.insert((&*row.org_id, row.event_id));
                    }
                    print
                })
                .collect(),
        );
    }
    (prints, candidates)
}

/// The rows to drop, as (record, index): ids in `stored`, and every occurrence of an id after the
/// first (compared exactly on a fingerprint match). And the (partition, fingerprint, arrival) of
/// the rows kept.
fn first_occurrences(
    batch: &[Pending],
    prints: &[Vec<u64>],
    stored: &HashSet<(String, uuid::Uuid)>,
) -> (Positions, Kept) {
    let row_count: usize = prints.iter().map(Vec::len).sum();
    let mut kept = Vec::with_capacity(row_count);
    let mut first: FastMap<u64, (usize, usize)> =
        FastMap::with_capacity_and_hasher(row_count, FixedState::default());
    let mut drop = Positions::default();
    for (record, pending) in batch.iter().enumerate() {
        let Ok(rows) = &pending.decoded else { continue };
        for (index, (row, &print)) in rows.iter().zip(&prints[record]).enumerate() {
            if !stored.is_empty() && stored.contains(&(row.org_id.to_string(), row.event_id)) {
                drop.insert((record, index));
                continue;
            }
            match first.get(&print) {
                Some(&(r, i)) if same_id(batch, (r, i), row) => {
                    drop.insert((record, index));
                    continue;
                }
                Some(_) => {}
                None => {
                    first.insert(print, (record, index));
                }
            }
            kept.push((pending.partition, print, row.received_at));
        }
    }
    (drop, kept)
}

fn remove_rows(batch: &mut [Pending], drop: &Positions) {
    if drop.is_empty() {
        return;
    }
    for (record, pending) in batch.iter_mut().enumerate() {
        if let Ok(rows) = &mut pending.decoded {
            let mut index = 0;
            rows.retain(|_| {
                let keep = !drop.contains(&(record, index));
                index += 1;
                keep
            });
        }
    }
}

fn same_id(batch: &[Pending], (record, index): (usize, usize), row: &Row) -> bool {
    match &batch[record].decoded {
        Ok(rows) => {
            rows.get(index).is_some_and(|other| other.org_id == row.org_id && other.event_id == row.event_id)
        }
        Err(_) => false,
    }
}

impl Stage for Deduplicator {
    type Outcome = Outcome;

    async fn apply(
        &mut self,
        batch: &mut Vec<Pending>,
        context: &BatchContext,
    ) -> Result<Outcome, ClickHouseError> {
        self.filter(batch, &context.assigned, context.now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rebuild that fails leaves its partitions unloaded, so the next try rebuilds them instead
    /// of trusting an empty (or half-filled) window. Nothing listens on port 1: the query fails.
    #[tokio::test]
    async fn a_failed_rebuild_marks_no_partition_loaded() {
        let mut dedup = unreachable_dedup();
        let failed = dedup.filter(&mut [], &BTreeSet::from([0, 3]), 1_800_000_000).await;
        assert!(failed.is_err());
        assert!(dedup.partitions.is_empty(), "no partition may count as rebuilt");
    }

    /// A record of partition 0 with one row per (org, event id number).
    fn record(offset: i64, ids: &[(&str, u128)]) -> Pending {
        let lines: String = ids
            .iter()
            .map(|(org, id)| {
                format!(
                    concat!(
                        r#"{{"org_id":"{}","event_id":"{}","timestamp":"2027-01-01 00:00:00","timestamp_ms":0,"#,
                        r#""received_at":"2027-01-01 00:00:01","provider":"p","model":"m","prompt_tokens":1,"#,
                        r#""completion_tokens":1,"total_tokens":2,"cost_nanos":5,"cost_source":"client","#,
                        r#""latency_ms":1,"status":"success","http_status":0,"error":"","execution_id":"","#,
                        r#""agent_id":"","user_id":"","service":"","action":"","request_id":"","input_bytes":0,"#,
                        r#""output_bytes":0,"metadata_keys":[],"metadata_values":[]}}"#,
                        "\n"
                    ),
                    org,
                    uuid::Uuid::from_u128(*id)
                )
            })
            .collect();
        Pending::decode(crate::batch::RawRecord {
            partition: 0,
            offset,
            kafka_timestamp_ms: 0,
            original: lines.into_bytes().into(),
            format: Ok(tally_schemas::record::RecordFormat::JsonEachRow),
        })
    }

    fn ids(batch: &[Pending]) -> Vec<u128> {
        batch.iter().flat_map(|p| p.decoded.as_ref().unwrap()).map(|row| row.event_id.as_u128()).collect()
    }

    /// A deduplicator whose queries fail: nothing listens on port 1.
    fn unreachable_dedup() -> Deduplicator {
        let unreachable = tally_common::ch::ChConfig {
            url: "http://127.0.0.1:1".into(),
            database: "tally".into(),
            user: "default".into(),
            password: String::new(),
            cluster: None,
        };
        Deduplicator::new(EventStore::new(&unreachable), 24, 10_000_000)
    }

    /// Partition 0's window loaded (empty), so checks need no query.
    fn loaded_dedup() -> Deduplicator {
        let mut dedup = unreachable_dedup();
        dedup.partitions.insert(0, IdWindow::default());
        dedup
    }

    /// The check made while the previous batch is inserted: that batch's ids go into the window
    /// first, so a next batch repeating one of them is not prechecked (its candidate must be
    /// confirmed by a query after that insert); a batch with only its own repeats is, and applying
    /// it drops exactly those.
    #[test]
    fn a_batch_checked_ahead_sees_the_ids_of_the_batch_being_inserted() {
        let assigned = BTreeSet::from([0]);
        let mut dedup = loaded_dedup();
        dedup.kept = vec![(0, fingerprint("org", &uuid::Uuid::from_u128(1)), 1_798_761_601)];
        let mut lent = dedup.lend();
        assert_eq!(dedup.ids(), 0, "lent out");
        let repeats_inserted = [record(10, &[("org", 2), ("org", 1)])];
        assert!(lent.precheck(&repeats_inserted, &assigned, 1_798_761_601).is_none());
        assert!(lent.partitions[&0].contains(fingerprint("org", &uuid::Uuid::from_u128(1))));

        let mut own_repeats =
            vec![record(11, &[("org", 3), ("other", 3)]), record(12, &[("org", 3), ("org", 4)])];
        let prechecked = lent.precheck(&own_repeats, &assigned, 1_798_761_601).expect("no id in the window");
        dedup.give_back(lent);
        assert_eq!(dedup.ids(), 1);
        let outcome = dedup.apply_prechecked(&mut own_repeats, prechecked).expect("still valid");
        assert_eq!(outcome.duplicates, 1);
        assert_eq!(ids(&own_repeats), [3, 3, 4], "one per org");
        // 2027-01-01 00:00:01, the rows' arrival: none expires.
        dedup.record_stored(1_798_761_601);
        assert_eq!(dedup.ids(), 4);
    }

    /// A check made ahead no longer holds after a rebalance (the windows were reset) or when an
    /// earlier stage removed rows (positions moved): the batch is filtered again instead.
    #[test]
    fn a_check_made_ahead_is_dropped_after_a_reset_or_a_changed_batch() {
        let assigned = BTreeSet::from([0]);
        let batch = || vec![record(1, &[("org", 1), ("org", 1)]), record(2, &[("org", 2)])];
        let mut dedup = loaded_dedup();
        let mut lent = dedup.lend();
        let prechecked = lent.precheck(&batch(), &assigned, 1_798_761_601).unwrap();
        dedup.give_back(lent);
        dedup.reset();
        assert!(dedup.apply_prechecked(&mut batch(), prechecked).is_none());

        let mut dedup = loaded_dedup();
        let mut lent = dedup.lend();
        let prechecked = lent.precheck(&batch(), &assigned, 1_798_761_601).unwrap();
        dedup.give_back(lent);
        let mut changed = batch();
        changed.pop();
        assert!(dedup.apply_prechecked(&mut changed, prechecked).is_none());
        assert_eq!(ids(&changed), [1, 1], "left as it was");

        // A partition whose window is not loaded (assigned, not rebuilt yet) needs the rebuild.
        let mut lent = loaded_dedup().lend();
        assert!(lent.precheck(&batch(), &BTreeSet::from([0, 1]), 1_798_761_601).is_none());
    }

    #[test]
    fn window_remembers_and_expires_by_arrival_hour() {
        let mut window = IdWindow::default();
        let t0 = 1_800_000_000u32;
        let a = fingerprint("org_a", &uuid::Uuid::from_u128(1));
        let b = fingerprint("org_b", &uuid::Uuid::from_u128(1));
        assert_ne!(a, b, "the org is part of the key");
        window.insert(a, t0);
        assert!(window.contains(a));
        assert!(!window.contains(b));
        window.expire(t0 + 23 * 3600, 24);
        assert!(window.contains(a), "23 h old, window 24 h");
        window.insert(b, t0 + 23 * 3600);
        window.expire(t0 + 24 * 3600 + 3599, 24);
        assert!(!window.contains(a), "24 whole hours old");
        assert!(window.contains(b));
        assert_eq!(window.len(), 1);
    }

    #[test]
    fn a_later_arrival_refreshes_the_hour_and_future_tags_do_not_expire() {
        let mut window = IdWindow::default();
        let t0 = 1_800_000_000u32;
        let a = fingerprint("org", &uuid::Uuid::from_u128(7));
        window.insert(a, t0);
        window.insert(a, t0 + 10 * 3600);
        window.insert(a, t0 + 3600);
        assert_eq!(window.len(), 1);
        window.expire(t0 + 30 * 3600, 24);
        assert!(window.contains(a), "refreshed at +10 h: 20 h old");
        // An ingest clock ahead of the consumer's: kept, not wrapped into an old age.
        let skewed = fingerprint("org", &uuid::Uuid::from_u128(8));
        window.insert(skewed, t0 + 40 * 3600);
        window.expire(t0 + 30 * 3600, 24);
        assert!(window.contains(skewed));
    }

    /// Ids of `n` distinct events of one org, from `first`.
    fn prints(first: u128, n: u128) -> Vec<u64> {
        (first..first + n).map(|i| fingerprint("org", &uuid::Uuid::from_u128(i))).collect()
    }

    /// Past its bound the window forgets its oldest two-minute slots of arrivals, over all its
    /// partitions, down to 7/8 of the bound; the newest arrivals are all kept and the time from
    /// which every arrival is remembered is reported.
    #[test]
    fn past_its_bound_the_window_forgets_its_oldest_arrivals_first() {
        let now = 1_800_000_000 / SLOT_SECONDS * SLOT_SECONDS + 30;
        let budget = Budget::new(1_000, 24);
        let (hour_ago, ten_min_ago) = (prints(0, 300), prints(1_000, 300));
        let (just_now, future) = (prints(2_000, 300), prints(3_000, 100));
        let mut a = IdWindow::default();
        let mut b = IdWindow::default();
        hour_ago.iter().for_each(|&p| a.insert(p, now - 3600));
        ten_min_ago.iter().for_each(|&p| b.insert(p, now - 600));
        just_now.iter().for_each(|&p| a.insert(p, now));
        assert_eq!(budget.enforce(&mut [&mut a, &mut b], now), None, "900 ids: within the bound");
        // An ingest clock ahead of the consumer's counts as just arrived.
        future.iter().for_each(|&p| b.insert(p, now + 300));
        b.insert(prints(5_000, 1)[0], now - 25 * 3600); // past the window, not expired yet

        let eviction = budget.enforce(&mut [&mut a, &mut b], now).expect("1001 ids: over");
        // 875 may stay: the 400 of the current slot and the 300 of ten minutes ago fit, the hour-old
        // ones and the expired one do not. Every arrival after the hour-old slot is remembered.
        assert_eq!(eviction, Eviction { ids: 301, remembered_since: now - 30 - 3600 + SLOT_SECONDS });
        assert!(hour_ago.iter().all(|&p| !a.contains(p)));
        assert!(ten_min_ago.iter().all(|&p| b.contains(p)));
        assert!(just_now.iter().all(|&p| a.contains(p)) && future.iter().all(|&p| b.contains(p)));
        assert_eq!(a.len() + b.len(), 700);

        // Were the newest slot alone over 7/8 of the bound, it would go too: the bound holds.
        let mut c = IdWindow::default();
        prints(10_000, 1_001).iter().for_each(|&p| c.insert(p, now));
        let eviction = budget.enforce(&mut [&mut c], now).expect("over");
        assert_eq!((eviction.ids, c.len()), (1_001, 0));
        assert_eq!(eviction.remembered_since, now - 30 + SLOT_SECONDS, "nothing is remembered");
    }

    /// A rebuild counts the window's ids by slot first and loads only the newest slots that fit
    /// 7/8 of the bound beside the ids already held.
    #[test]
    fn a_rebuild_loads_only_the_newest_slots_that_fit() {
        let budget = Budget::new(1_000, 24);
        let slots = BTreeMap::from([(3_600, 500), (7_200, 300), (7_320, 200), (7_440, 100)]);
        assert_eq!(budget.newest_that_fit(&slots, 0), Some(Eviction { ids: 500, remembered_since: 7_200 }));
        // 475 of the 875 already held: only the two newest slots fit.
        assert_eq!(budget.newest_that_fit(&slots, 475), Some(Eviction { ids: 800, remembered_since: 7_320 }));
        assert_eq!(budget.newest_that_fit(&BTreeMap::from([(0, 600), (120, 400)]), 0), None, "1000 fit");
        // Not even the newest slot fits: nothing is loaded.
        let one = BTreeMap::from([(240, 1_200)]);
        assert_eq!(budget.newest_that_fit(&one, 0), Some(Eviction { ids: 1_200, remembered_since: 360 }));
    }

    /// The deduplicator reports the ids its bound evicted once, and how far back it still
    /// remembers: growing back to the configured window as time passes; a reset (rebalance)
    /// forgets the eviction (the rebuild applies the bound again).
    #[test]
    fn the_deduplicator_reports_what_its_bound_forgot() {
        let now = 1_800_000_000 / SLOT_SECONDS * SLOT_SECONDS;
        let mut dedup = loaded_dedup();
        dedup.budget = Budget::new(1_000, 24);
        assert_eq!(dedup.remembered_seconds(now), 24 * 3600);
        dedup.kept = prints(0, 600).into_iter().map(|p| (0, p, now - 7200)).collect();
        dedup.record_stored(now);
        assert_eq!((dedup.take_evicted(), dedup.ids()), (0, 600));
        // Checked ahead while lent: the lent windows are kept within the bound too.
        dedup.kept = prints(1_000, 600).into_iter().map(|p| (0, p, now)).collect();
        let mut lent = dedup.lend();
        assert!(lent.precheck(&[], &BTreeSet::from([0]), now).is_some());
        dedup.give_back(lent);
        assert_eq!((dedup.take_evicted(), dedup.take_evicted(), dedup.ids()), (600, 0, 600));
        // The two-hour-old slot went: every arrival since the slot after it is remembered.
        assert_eq!(dedup.remembered_seconds(now), 7200 - SLOT_SECONDS);
        assert_eq!(dedup.remembered_seconds(now + 3600), 3 * 3600 - SLOT_SECONDS);
        assert_eq!(dedup.remembered_seconds(now + 30 * 3600), 24 * 3600);
        dedup.reset();
        assert_eq!(dedup.remembered_seconds(now), 24 * 3600);
    }

    #[test]
    fn memory_per_million_ids() {
        let mut window = IdWindow::default();
        for i in 0..1_000_000u128 {
            window.insert(fingerprint("org_0123456789", &uuid::Uuid::from_u128(i)), 1_800_000_000);
        }
        assert_eq!(window.len(), 1_000_000, "no two of a million fingerprints collide");
        let bytes = window.heap_bytes();
        // 2^21 buckets of 9 bytes: 18 MiB for a table that just grew; 10.3 bytes per id when full.
        assert!(bytes <= 19 * 1024 * 1024, "{bytes}");
        assert!(bytes >= 9_000_000, "{bytes}");
    }
}
