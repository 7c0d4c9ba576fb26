//! The README's "Validation bounds" table states the bounds of `limits.rs`; this keeps them equal.

use tally_schemas::limits::*;

fn table_row(readme: &str, bound: &str) -> String {
    readme
        .lines()
        .find(|line| line.starts_with(&format!("| {bound} |")))
        .unwrap_or_else(|| panic!("README has no row for {bound:?}"))
        .to_owned()
}

#[test]
fn readme_states_the_enforced_bounds() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README.md");
    let rows = [
        ("events per request", format!("| {MAX_EVENTS_PER_REQUEST} |")),
        ("event age (timestamp before receipt)", format!("| {} days |", MAX_EVENT_AGE_MS / 86_400_000)),
        ("event in the future", format!("| {} minutes |", MAX_EVENT_FUTURE_MS / 60_000)),
        ("tokens (each count)", format!("| {MAX_TOKENS} |")),
        ("cost per event", format!("| {} USD |", MAX_COST_NANOS / NANOS_PER_USD)),
        ("latency", format!("| {MAX_LATENCY_MS} ms |")),
        ("provider / model name", format!("| {MAX_NAME_LEN} bytes |")),
        ("ids (`executionId`, `userId`, …)", format!("| {MAX_ID_LEN} bytes |")),
        ("error message (truncated, not rejected)", format!("| {MAX_ERROR_LEN} bytes |")),
        (
            "metadata",
            format!(
                "| {MAX_METADATA_ENTRIES} entries, keys {MAX_METADATA_KEY_LEN} bytes, values {MAX_METADATA_VALUE_LEN} bytes |"
            ),
        ),
        ("`Idempotency-Key`", format!("| {MAX_IDEMPOTENCY_KEY_LEN} bytes |")),
    ];
    for (bound, value) in rows {
        let row = table_row(&readme, bound);
        assert!(row.ends_with(&value), "README row {row:?} should end with {value:?}");
    }
}
