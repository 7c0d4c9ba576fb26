//! The cluster form of the migrations (issue 13): the same `.sql` files, each single-node
//! statement rewritten for a ClickHouse cluster of shards × replicas, so one source makes both
//! schemas and a test holds them together.
//!
//! - `CREATE DATABASE` and every `CREATE TABLE`/`MATERIALIZED VIEW`/`RENAME` run `ON CLUSTER`.
//! - `*MergeTree(args)` becomes `Replicated*MergeTree('<path>', '{replica}', args)` with the usual
//!   macros. The events and rollup tables are sharded (path under `{shard}`): an org's rows, its
//!   rollups and its dedup window live on the shard that owns the org. The admin tables and the
//!   price list are small and read by every node: one replica set over all nodes (path under
//!   `all`).
//! - Each sharded table gets a `Distributed` table `<table>_all` over the cluster, for analysts
//!   and cross-org reads, sharded by `SHARDING_KEY`: the shard of an org is
//!   `cityHash64(org_id) % shards` (equal weights), the rule the consumer asks ClickHouse to
//!   evaluate when it routes rows (so the two can never disagree).
//! - `INSERT`s (seed prices) are unchanged: run on one node, replication copies them.
//!
//! `tally_common::migrate` applies this form when `TALLY_CLICKHOUSE_CLUSTER` is set.

/// The expression that picks an org's shard (modulo the number of shards).
pub const SHARDING_KEY: &str = "cityHash64(org_id)";

/// Tables sharded by org; every other table is replicated to every node.
pub const SHARDED: [&str; 3] = ["events", "rollup_hourly", "rollup_daily"];

/// The cluster statements for one single-node statement of a migration (databases already
/// substituted), on cluster `cluster`.
pub fn for_cluster(statement: &str, cluster: &str) -> Vec<String> {
    let on = format!(" ON CLUSTER {cluster}");
    let head: String = statement.split_whitespace().take(3).collect::<Vec<_>>().join(" ").to_uppercase();
    if head.starts_with("CREATE DATABASE") || head.starts_with("RENAME TABLE") {
        return vec![format!("{statement}{on}")];
    }
    if head.starts_with("CREATE MATERIALIZED VIEW") {
        return vec![after_name(statement, &on)];
    }
    if !head.starts_with("CREATE TABLE") {
        return vec![statement.to_owned()];
    }
    let Some((name, _)) = created_name(statement) else { return vec![statement.to_owned()] };
    let (database, table) = name.split_once('.').unwrap_or(("", name));
    let sharded = SHARDED.contains(&table);
    let path = format!("/clickhouse/tables/{}/{database}/{table}", if sharded { "{shard}" } else { "all" });
    let local = replicated(&after_name(statement, &on), &path);
    let mut out = vec![local];
    if sharded {
        out.push(format!(
            "CREATE TABLE IF NOT EXISTS {name}_all{on} AS {name} ENGINE = Distributed({cluster}, {database}, {table}, {SHARDING_KEY})"
        ));
    }
    out
}

/// The qualified name a `CREATE TABLE|MATERIALIZED VIEW [IF NOT EXISTS] name` creates, and the
/// byte offset just after it.
fn created_name(statement: &str) -> Option<(&str, usize)> {
    // Words with their byte offsets.
    let mut words = Vec::new();
    let mut offset = 0;
    for word in statement.split_whitespace() {
        let start = statement[offset..].find(word)? + offset;
        words.push((word, start));
        offset = start + word.len();
    }
    let is = |i: usize, keyword: &str| words.get(i).is_some_and(|(w, _)| w.eq_ignore_ascii_case(keyword));
    let kind = (0..words.len()).find(|&i| is(i, "TABLE") || is(i, "VIEW"))?;
    let at =
        if is(kind + 1, "IF") && is(kind + 2, "NOT") && is(kind + 3, "EXISTS") { kind + 4 } else { kind + 1 };
    let (word, start) = *words.get(at)?;
    let name = word.split('(').next()?;
    Some((name, start + name.len()))
}

/// `statement` with `text` inserted right after the name it creates.
fn after_name(statement: &str, text: &str) -> String {
    match created_name(statement) {
        Some((_, end)) => format!("{}{text}{}", &statement[..end], &statement[end..]),
        None => statement.to_owned(),
    }
}

/// `ENGINE = XMergeTree(args)` → `ENGINE = ReplicatedXMergeTree('path', '{replica}'[, args])`.
fn replicated(statement: &str, path: &str) -> String {
    let Some(engine_at) = statement.find("ENGINE = ") else { return statement.to_owned() };
    let engine_start = engine_at + "ENGINE = ".len();
    let rest = &statement[engine_start..];
    let Some(open) = rest.find('(') else { return statement.to_owned() };
    let engine = &rest[..open];
    if !engine.ends_with("MergeTree") || engine.starts_with("Replicated") {
        return statement.to_owned();
    }
    let Some(close) = rest[open..].find(')') else { return statement.to_owned() };
    let args = rest[open + 1..open + close].trim();
    let mut replicated_args = format!("'{path}', '{{replica}}'");
    if !args.is_empty() {
        replicated_args.push_str(&format!(", {args}"));
    }
    format!(
        "{}Replicated{engine}({replicated_args}){}",
        &statement[..engine_start],
        &rest[open + close + 1..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrations::MIGRATIONS;

    fn cluster_schema() -> Vec<String> {
        MIGRATIONS.iter().flat_map(|m| m.statements("tally")).flat_map(|s| for_cluster(&s, "tally")).collect()
    }

    #[test]
    fn sharded_tables_become_replicated_per_shard_with_a_distributed_table_over_the_cluster() {
        let schema = cluster_schema();
        let events =
            schema.iter().find(|s| s.starts_with("CREATE TABLE IF NOT EXISTS tally.events ")).unwrap();
        assert!(
            events.starts_with("CREATE TABLE IF NOT EXISTS tally.events ON CLUSTER tally\n("),
            "{events}"
        );
        assert!(
            events.contains(
                "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/tally/events', '{replica}')\n"
            ),
            "{events}"
        );
        assert!(schema.contains(
            &"CREATE TABLE IF NOT EXISTS tally.events_all ON CLUSTER tally AS tally.events ENGINE = Distributed(tally, tally, events, cityHash64(org_id))"
                .to_owned()
        ));
        let hourly =
            schema.iter().find(|s| s.starts_with("CREATE TABLE IF NOT EXISTS tally.rollup_hourly ")).unwrap();
        assert!(hourly.contains(
            "ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/tally/rollup_hourly', '{replica}')"
        ));
        assert!(schema
            .iter()
            .any(|s| s.starts_with("CREATE TABLE IF NOT EXISTS tally.rollup_daily_all ON CLUSTER")));
    }

    #[test]
    fn admin_tables_and_prices_are_one_replica_set_over_every_node_keeping_their_arguments() {
        let schema = cluster_schema();
        let orgs = schema.iter().find(|s| s.starts_with("CREATE TABLE IF NOT EXISTS tally.orgs ")).unwrap();
        assert!(
            orgs.contains("ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/tally/orgs', '{replica}', version)"),
            "{orgs}"
        );
        assert!(!schema.iter().any(|s| s.contains("orgs_all") || s.contains("model_prices_all")));
    }

    #[test]
    fn every_ddl_statement_runs_on_the_cluster_and_inserts_run_once() {
        let single: Vec<String> = MIGRATIONS.iter().flat_map(|m| m.statements("tally")).collect();
        for statement in &single {
            let clustered = for_cluster(statement, "tally");
            if statement.starts_with("INSERT") {
                assert_eq!(clustered, vec![statement.clone()]);
            } else {
                assert!(clustered.iter().all(|s| s.contains(" ON CLUSTER tally")), "{clustered:?}");
            }
        }
        let view = cluster_schema().into_iter().find(|s| s.contains("MATERIALIZED VIEW")).unwrap();
        assert!(view.starts_with(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS tally.rollup_hourly_mv ON CLUSTER tally TO"
        ));
        // The single-node schema is the same source untouched.
        assert!(single.iter().all(|s| !s.contains("ON CLUSTER") && !s.contains("Replicated")));
    }
}
