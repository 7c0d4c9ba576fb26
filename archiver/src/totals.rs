//! Per-org row counts and exact sums: what the writer counted, what ClickHouse holds and what the
//! files read back say must be equal before a manifest is published.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One org's rows of a month and their exact sums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct Sums {
    pub rows: u64,
    /// Nano-dollars (1e-9 USD).
    pub cost_nanos: i64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Sums {
    pub fn add(&mut self, other: &Sums) {
        self.rows += other.rows;
        self.cost_nanos += other.cost_nanos;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
    }
}

/// Sums per org id, in org order.
pub type OrgSums = BTreeMap<String, Sums>;

/// The sums of all orgs together.
pub fn total(orgs: &OrgSums) -> Sums {
    orgs.values().fold(Sums::default(), |mut all, s| {
        all.add(s);
        all
    })
}

/// The orgs whose sums differ between `a` and `b` (missing counts as zero), for messages.
pub fn differences(a: &OrgSums, b: &OrgSums) -> Vec<String> {
    let orgs: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    orgs.into_iter()
        .filter_map(|org| {
            let (x, y) = (a.get(org).copied().unwrap_or_default(), b.get(org).copied().unwrap_or_default());
            (x != y).then(|| format!("{org}: {x:?} vs {y:?}"))
        })
        .collect()
}
