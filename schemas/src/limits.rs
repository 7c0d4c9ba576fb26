//! Every validation bound Tally enforces, in one place. The README's "Validation bounds" table
//! states them for users; `tests/readme.rs` fails when the two disagree.

/// Most events one `POST /v1/ingest` or `POST /analytics/events` body may carry.
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;

/// How far in the past an event's timestamp may be, relative to when Tally received it (35 days:
/// a month of backfill plus slack). Older events are rejected with `timestamp_too_old`.
pub const MAX_EVENT_AGE_MS: i64 = 35 * 24 * 3600 * 1000;

/// How far in the future an event's timestamp may be (clock skew between SDK hosts and Tally).
pub const MAX_EVENT_FUTURE_MS: i64 = 5 * 60 * 1000;

/// Upper bound for each token count of one event (prompt, completion, total).
pub const MAX_TOKENS: u64 = 100_000_000;

/// Upper bound for one event's cost: 1 000 000 USD, in nano-dollars. Below 2^53, so a client cost
/// sent as a JSON float converts to nano-dollars without rounding error.
pub const MAX_COST_NANOS: i64 = 1_000_000 * NANOS_PER_USD;

/// Nano-dollars per US dollar: the fixed-point unit of every amount of money in Tally.
pub const NANOS_PER_USD: i64 = 1_000_000_000;

/// Upper bound for latency: one day, in milliseconds.
pub const MAX_LATENCY_MS: u64 = 24 * 3600 * 1000;

/// Upper bound for the byte sizes of a seed-004 event (`size.inputBytes`, `size.outputBytes`): 1 TiB.
pub const MAX_PAYLOAD_BYTES: u64 = 1 << 40;

/// Longest provider or model name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Longest identifier (`executionId`, `agentId`, `userId`, `service`, `action`, `requestId`), in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Error messages longer than this many bytes are truncated (at a character boundary), not rejected.
pub const MAX_ERROR_LEN: usize = 2048;

/// Most metadata entries per event, and the longest key and value, in bytes.
pub const MAX_METADATA_ENTRIES: usize = 32;
pub const MAX_METADATA_KEY_LEN: usize = 64;
pub const MAX_METADATA_VALUE_LEN: usize = 512;

/// Longest `Idempotency-Key` request header, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
