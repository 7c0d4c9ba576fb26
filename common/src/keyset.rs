//! The active API keys, held in memory and refreshed in the background (from ClickHouse, or from
//! the control topic's snapshots), so authenticating a request costs a SHA-256 and a hash-map
//! lookup, never a round trip. A revoked key disappears at the next refresh (every few seconds;
//! the bound is the refresh interval, plus the publishing interval through the control topic).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clickhouse::Row;
use serde::Deserialize;
use tally_schemas::control::KeyEntry;
use tally_schemas::keys;
use tally_schemas::plan::Plan;
use tokio_util::sync::CancellationToken;

use crate::ch::ChConfig;
use crate::snapshot::{spawn_reloader, Snapshot};

/// What a valid key tells about its org.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgInfo {
    pub org_id: Arc<str>,
    pub name: String,
    pub plan: Plan,
    /// Events per minute, the org's override or its plan's default.
    pub events_per_minute: u32,
    /// Burst in events; 0 means "same as the per-minute limit".
    pub burst: u32,
}

#[derive(Row, Deserialize)]
struct KeyRow {
    key_hash: String,
    owner: String,
    is_revoked: u8,
}

#[derive(Row, Deserialize)]
struct OrgRow {
    org_id: String,
    org_name: String,
    org_plan: String,
    org_limit: u32,
    org_burst: u32,
    is_deleted: u8,
}

/// The latest version of every org that is not deleted.
pub async fn load_orgs(config: &ChConfig) -> Result<Vec<OrgInfo>, clickhouse::error::Error> {
    let rows: Vec<OrgRow> = config.client().query(&orgs_sql(config, "")).fetch_all().await?;
    Ok(rows.into_iter().filter_map(OrgRow::into_live_org).collect())
}

/// The latest version of one org, or None when it does not exist or is deleted: one query that
/// reads that org's rows only, not the whole table.
pub async fn load_org(config: &ChConfig, org_id: &str) -> Result<Option<OrgInfo>, clickhouse::error::Error> {
    let sql = orgs_sql(config, "WHERE org_id = ? ");
    let row: Option<OrgRow> = config.client().query(&sql).bind(org_id).fetch_optional().await?;
    Ok(row.and_then(OrgRow::into_live_org))
}

/// The latest version of each org (of those `filter` keeps), deleted ones included.
fn orgs_sql(config: &ChConfig, filter: &str) -> String {
    format!(
        "SELECT org_id, argMax(name, version) AS org_name, toString(argMax(plan, version)) AS org_plan, \
         argMax(rate_limit_per_min, version) AS org_limit, argMax(rate_limit_burst, version) AS org_burst, \
         argMax(deleted, version) AS is_deleted FROM {} {filter}GROUP BY org_id ORDER BY org_id",
        config.table("orgs")
    )
}

impl OrgRow {
    fn into_live_org(self) -> Option<OrgInfo> {
        if self.is_deleted != 0 {
            return None;
        }
        let plan = self.org_plan.parse().unwrap_or(Plan::Free);
        Some(OrgInfo {
            org_id: Arc::from(self.org_id),
            name: self.org_name,
            plan,
            events_per_minute: if self.org_limit > 0 {
                self.org_limit
            } else {
                plan.default_events_per_minute()
            },
            burst: self.org_burst,
        })
    }
}

/// SHA-256 digest → org. The keys are already uniformly distributed digests, and the map is built
/// from the store, never from requests, so a fast non-keyed hash is enough (SipHash showed in the
/// ingest's per-request profile).
type KeyMap = HashMap<[u8; 32], Arc<OrgInfo>, rustc_hash::FxBuildHasher>;

#[derive(Debug, Default)]
pub struct KeySet {
    /// SHA-256 of each active key (bytes) → its org.
    by_hash: Arc<Snapshot<KeyMap>>,
}

impl KeySet {
    pub fn new() -> Arc<Self> {
        Arc::new(KeySet::default())
    }

    /// The org of a presented key, if the key is active.
    pub fn lookup(&self, presented: &str) -> Option<Arc<OrgInfo>> {
        if !keys::looks_valid(presented) {
            return None;
        }
        self.by_hash.current().get(&keys::digest(presented)).cloned()
    }

    /// Has at least one refresh succeeded? Until then every key is unknown.
    pub fn is_loaded(&self) -> bool {
        self.by_hash.is_loaded()
    }

    /// Reloads every active key with its org; returns how many there are.
    pub async fn refresh(&self, config: &ChConfig) -> Result<usize, clickhouse::error::Error> {
        let map = load_keys(config).await?;
        let count = map.len();
        self.by_hash.replace(map);
        Ok(count)
    }

    /// Replaces the key set with `entries` (a control-topic snapshot); returns how many keys.
    pub fn replace(&self, entries: Vec<KeyEntry>) -> usize {
        let map = key_map(entries);
        let count = map.len();
        self.by_hash.replace(map);
        count
    }

    /// Refreshes every `interval` until `shutdown`; failures keep the last good set and are logged.
    pub fn spawn_refresher(
        &self,
        config: ChConfig,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        spawn_reloader(Arc::clone(&self.by_hash), "api keys", interval, shutdown, move || {
            let config = config.clone();
            async move { load_keys(&config).await }
        })
    }
}

/// Every active key (not revoked, org not deleted) with its org.
async fn load_keys(config: &ChConfig) -> Result<KeyMap, clickhouse::error::Error> {
    Ok(key_map(load_key_entries(config).await?))
}

/// Every active key (not revoked, org not deleted) with its org, as the control topic carries them.
pub async fn load_key_entries(config: &ChConfig) -> Result<Vec<KeyEntry>, clickhouse::error::Error> {
    let orgs: HashMap<Arc<str>, OrgInfo> =
        load_orgs(config).await?.into_iter().map(|org| (Arc::clone(&org.org_id), org)).collect();
    let sql = format!(
        "SELECT key_hash, argMax(org_id, version) AS owner, argMax(revoked, version) AS is_revoked FROM {} GROUP BY key_hash",
        config.table("api_keys")
    );
    let rows: Vec<KeyRow> = config.client().query(&sql).fetch_all().await?;
    Ok(rows
        .into_iter()
        .filter(|row| row.is_revoked == 0)
        .filter_map(|row| {
            orgs.get(row.owner.as_str()).map(|org| KeyEntry {
                key_hash: row.key_hash,
                org_id: org.org_id.to_string(),
                name: org.name.clone(),
                plan: org.plan,
                events_per_minute: org.events_per_minute,
                burst: org.burst,
            })
        })
        .collect())
}

/// The lookup map of `entries`, one shared `OrgInfo` per org. An entry whose hash is not 64
/// lower-case hex digits matches no key (none is written so; it is logged and left out).
fn key_map(entries: Vec<KeyEntry>) -> KeyMap {
    let mut orgs: HashMap<String, Arc<OrgInfo>> = HashMap::new();
    entries
        .into_iter()
        .filter_map(|entry| {
            let Some(digest) = keys::digest_of_hash(&entry.key_hash) else {
                tracing::warn!(org_id = %entry.org_id, "an api key's stored hash is not a SHA-256 in hex; ignored");
                return None;
            };
            let org = orgs.entry(entry.org_id.clone()).or_insert_with(|| {
                Arc::new(OrgInfo {
                    org_id: Arc::from(entry.org_id.as_str()),
                    name: entry.name,
                    plan: entry.plan,
                    events_per_minute: entry.events_per_minute,
                    burst: entry.burst,
                })
            });
            Some((digest, Arc::clone(org)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tally_schemas::control::KeyEntry;
    use tally_schemas::keys;
    use tally_schemas::plan::Plan;

    use super::*;

    fn entry(key_hash: String, org_id: &str) -> KeyEntry {
        KeyEntry {
            key_hash,
            org_id: org_id.into(),
            name: org_id.into(),
            plan: Plan::Startup,
            events_per_minute: 600,
            burst: 0,
        }
    }

    #[test]
    fn keys_are_found_by_their_hash_and_a_malformed_stored_hash_matches_nothing() {
        let (a, b) = (keys::generate(), keys::generate());
        let set = KeySet::new();
        let loaded = set.replace(vec![
            entry(a.hash.clone(), "org-a"),
            entry(b.hash.to_uppercase(), "org-b"),
            entry("not a sha-256".into(), "org-c"),
        ]);
        assert_eq!(loaded, 1, "the malformed entries are left out");
        assert_eq!(set.lookup(&a.secret).unwrap().org_id.as_ref(), "org-a");
        assert!(set.lookup(&b.secret).is_none(), "hashes are stored in lower-case hex, as written");
        assert!(set.lookup(&keys::generate().secret).is_none());
        assert!(set.lookup("not a key").is_none());
    }
}
