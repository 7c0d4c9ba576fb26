//! Migrations and the API key set against the real ClickHouse of the local stack.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use clickhouse::Row;
use serde::Deserialize;
use tally_common::keyset::KeySet;
use tally_common::migrate::migrate;
use tally_schemas::keys;
use tally_schemas::migrations::MIGRATIONS;
use tally_testkit::{drop_database, migrated_database, new_database_config};

#[derive(Row, Deserialize)]
struct Count {
    n: u64,
}

#[tokio::test]
async fn migrations_run_concurrently_and_only_once() {
    let config = new_database_config("mig");
    let (a, b, c) = tokio::join!(migrate(&config), migrate(&config), migrate(&config));
    let mut applied: Vec<u32> = [a.unwrap(), b.unwrap(), c.unwrap()].concat();
    applied.sort_unstable();
    let expected: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(applied, expected, "each migration applied by exactly one runner");
    assert!(migrate(&config).await.unwrap().is_empty(), "a later run applies nothing");

    let client = config.client();
    let recorded: Count = client
        .query(&format!("SELECT count() AS n FROM {}", config.table("schema_migrations")))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(recorded.n, MIGRATIONS.len() as u64);
    let prices: Count = client
        .query(&format!("SELECT count() AS n FROM {} FINAL", config.table("model_prices")))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(prices.n, 13, "seed 000's price table");
    let lock: Count = client
        .query(
            "SELECT count() AS n FROM system.tables WHERE database = ? AND name = 'schema_migrations_lock'",
        )
        .bind(config.database.as_str())
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(lock.n, 0, "the lock is released");
    drop_database(&config).await;
}

#[tokio::test]
async fn changed_migration_is_refused() {
    let config = migrated_database("chk").await;
    config
        .client()
        .query(&format!(
            "INSERT INTO {} (version, name, checksum) VALUES (3, 'admin', 'tampered')",
            config.table("schema_migrations")
        ))
        .execute()
        .await
        .unwrap();
    let error = migrate(&config).await.unwrap_err().to_string();
    assert!(error.contains("was changed after it was applied"), "{error}");
    drop_database(&config).await;
}

#[tokio::test]
async fn an_earlier_text_listed_as_replaced_is_accepted_and_new_tables_get_the_new_settings() {
    let config = migrated_database("rep").await;
    let client = config.client();
    // A database migrated before 0002 gained `index_granularity = 256` recorded the old checksum.
    let rollups = &tally_schemas::migrations::MIGRATIONS[1];
    let old = rollups.replaces[0];
    client
        .query(&format!("ALTER TABLE {} DELETE WHERE version = 2", config.table("schema_migrations")))
        .execute()
        .await
        .unwrap();
    client
        .query(&format!(
            "INSERT INTO {} (version, name, checksum) VALUES (2, 'rollups', ?)",
            config.table("schema_migrations")
        ))
        .bind(old)
        .execute()
        .await
        .unwrap();
    // Mutations apply asynchronously on 18.16: wait until only the old record is left.
    for _ in 0..100 {
        let n: Count = client
            .query(&format!(
                "SELECT count() AS n FROM {} WHERE version = 2",
                config.table("schema_migrations")
            ))
            .fetch_one()
            .await
            .unwrap();
        if n.n == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(migrate(&config).await.unwrap(), Vec::<u32>::new(), "nothing to apply, nothing refused");
    assert!(!rollups.accepts("0000"), "only the listed texts");
    let create: String = client
        .query("SELECT create_table_query FROM system.tables WHERE database = ? AND name = 'rollup_hourly'")
        .bind(config.database.as_str())
        .fetch_one()
        .await
        .unwrap();
    assert!(create.contains("index_granularity = 256"), "{create}");
    drop_database(&config).await;
}

async fn insert_org(
    config: &tally_common::ch::ChConfig,
    org: &str,
    plan: &str,
    limit: u32,
    deleted: u8,
    version: u64,
) {
    config
        .client()
        .query(&format!(
            "INSERT INTO {} (org_id, name, plan, rate_limit_per_min, rate_limit_burst, created_at, deleted, version) VALUES (?, ?, ?, ?, 0, now(), ?, ?)",
            config.table("orgs")
        ))
        .bind(org)
        .bind(format!("{org} inc"))
        .bind(plan)
        .bind(limit)
        .bind(deleted)
        .bind(version)
        .execute()
        .await
        .unwrap();
}

async fn insert_key(
    config: &tally_common::ch::ChConfig,
    key: &keys::NewKey,
    org: &str,
    revoked: u8,
    version: u64,
) {
    config
        .client()
        .query(&format!(
            "INSERT INTO {} (key_hash, key_prefix, org_id, name, created_at, revoked, version) VALUES (?, ?, ?, 'k', now(), ?, ?)",
            config.table("api_keys")
        ))
        .bind(&key.hash)
        .bind(&key.display_prefix)
        .bind(org)
        .bind(revoked)
        .bind(version)
        .execute()
        .await
        .unwrap();
}

#[tokio::test]
async fn keyset_follows_orgs_keys_and_revocations() {
    let config = migrated_database("keys").await;
    let (a, b, gone) = (keys::generate(), keys::generate(), keys::generate());
    insert_org(&config, "org-a", "STARTUP", 0, 0, 1).await;
    insert_org(&config, "org-b", "FREE", 0, 0, 1).await;
    insert_org(&config, "org-b", "ENTERPRISE", 5000, 0, 2).await; // an update: latest version wins
    insert_org(&config, "org-gone", "FREE", 0, 1, 1).await;
    insert_key(&config, &a, "org-a", 0, 1).await;
    insert_key(&config, &b, "org-b", 0, 1).await;
    insert_key(&config, &gone, "org-gone", 0, 1).await;

    let keyset = KeySet::new();
    assert!(!keyset.is_loaded());
    assert_eq!(keyset.refresh(&config).await.unwrap(), 2);
    let org_a = keyset.lookup(&a.secret).expect("key a is active");
    assert_eq!((&*org_a.org_id, org_a.events_per_minute), ("org-a", 1000));
    let org_b = keyset.lookup(&b.secret).expect("key b is active");
    assert_eq!((org_b.plan.as_str(), org_b.events_per_minute), ("ENTERPRISE", 5000));
    assert!(keyset.lookup(&gone.secret).is_none(), "a deleted org's keys do not authenticate");
    assert!(keyset.lookup(&keys::generate().secret).is_none());
    assert!(keyset.lookup("garbage").is_none());

    insert_key(&config, &a, "org-a", 1, 2).await; // revoke
    keyset.refresh(&config).await.unwrap();
    assert!(keyset.lookup(&a.secret).is_none(), "revoked at the next refresh");
    assert!(keyset.lookup(&b.secret).is_some());
    drop_database(&config).await;
}

/// The guard the client's disabled RowBinary validation gave up: the one row type
/// (`tally_schemas::EventRow`, declared with its column list) and the real `events` table agree in
/// names, types and order. `dev/compat.py` checks the same on a current ClickHouse.
#[tokio::test]
async fn the_event_row_type_matches_the_events_table() {
    let config = migrated_database("row").await;
    // DESCRIBE lists the columns in table order on every version (18.16's system.columns has no
    // `position`); its first two tab-separated fields are the name and the type.
    let described = config
        .client()
        .query(&format!("DESCRIBE TABLE {}", config.table("events")))
        .fetch_bytes("TabSeparated")
        .unwrap()
        .collect()
        .await
        .unwrap();
    let actual: Vec<(String, String)> = String::from_utf8(described.to_vec())
        .unwrap()
        .lines()
        .map(|line| {
            let mut fields = line.split('\t');
            (fields.next().unwrap_or("").to_owned(), fields.next().unwrap_or("").replace("\\'", "'"))
        })
        .collect();
    let expected: Vec<(String, String)> = tally_schemas::row::event_columns()
        .into_iter()
        .map(|c| (c.name.to_owned(), c.clickhouse_type))
        .collect();
    assert_eq!(actual, expected);

    // And a row written with the type reads back equal through it.
    let event = tally_schemas::Event {
        event_id: uuid::Uuid::from_u128(7),
        org_id: "org-row".into(),
        received_at_ms: 1_780_000_000_000,
        timestamp_ms: 1_779_999_999_123,
        provider: "openai".into(),
        model: "gpt-4o".into(),
        prompt_tokens: 10,
        completion_tokens: 5,
        total_tokens: 15,
        cost_nanos: 123_456_789,
        cost_source: tally_schemas::CostSource::Computed,
        latency_ms: 250,
        status: tally_schemas::Status::Error,
        http_status: 503,
        error: "overloaded".into(),
        execution_id: "exec".into(),
        agent_id: "agent".into(),
        user_id: "user".into(),
        service: "svc".into(),
        action: "act".into(),
        request_id: "req".into(),
        input_bytes: 1,
        output_bytes: 2,
        metadata: vec![("k".into(), "v".into())],
    };
    let row = tally_schemas::EventRow::new(event, 3, 42, 1);
    let mut insert =
        config.client().insert_unescaped::<tally_schemas::EventRow>(&config.table("events")).await.unwrap();
    insert.write(&row).await.unwrap();
    insert.end().await.unwrap();
    let sql = format!("SELECT {} FROM {}", tally_schemas::row::select_list(), config.table("events"));
    let read: Vec<tally_schemas::EventRow> = config.client().query(&sql).fetch_all().await.unwrap();
    assert_eq!(read, [row]);
    drop_database(&config).await;
}

/// `load_org` reads one org's latest version: a rename shows, a deleted org is gone, another org
/// and an unknown id are told apart; `load_orgs` agrees.
#[tokio::test]
async fn one_org_is_read_at_its_latest_version() {
    let config = migrated_database("org").await;
    tally_testkit::create_org_with_key(&config, "org-a", "FREE", 0).await;
    tally_testkit::create_org_with_key(&config, "org-b", "STARTUP", 500).await;
    let insert = format!(
        "INSERT INTO {} (org_id, name, plan, rate_limit_per_min, rate_limit_burst, created_at, deleted, version) \
         VALUES (?, ?, 'FREE', 0, 0, now(), ?, 2)",
        config.table("orgs")
    );
    config.client().query(&insert).bind("org-a").bind("renamed").bind(0u8).execute().await.unwrap();
    config.client().query(&insert).bind("org-b").bind("org-b").bind(1u8).execute().await.unwrap();

    let a = tally_common::keyset::load_org(&config, "org-a").await.unwrap().expect("org-a exists");
    assert_eq!((&*a.org_id, a.name.as_str()), ("org-a", "renamed"));
    assert!(tally_common::keyset::load_org(&config, "org-b").await.unwrap().is_none(), "deleted");
    assert!(tally_common::keyset::load_org(&config, "org-c").await.unwrap().is_none(), "unknown");
    let all = tally_common::keyset::load_orgs(&config).await.unwrap();
    assert_eq!(all.iter().map(|o| &*o.org_id).collect::<Vec<_>>(), ["org-a"]);
    drop_database(&config).await;
}

/// Runs migrations 1..=4 by hand, as a database made before the admin tables moved has them.
async fn database_before_migration_5(config: &tally_common::ch::ChConfig) {
    let client = config.client();
    let db = &config.database;
    client.query(&format!("CREATE DATABASE IF NOT EXISTS {db}")).execute().await.unwrap();
    client
        .query(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, name String, checksum String, applied_at DateTime('UTC')) ENGINE = MergeTree() ORDER BY version"
        ))
        .execute()
        .await
        .unwrap();
    for migration in MIGRATIONS.iter().filter(|m| m.version < 5) {
        for statement in migration.statements(db) {
            client.query_raw(&statement).execute().await.unwrap();
        }
        client
            .query(&format!(
                "INSERT INTO {db}.schema_migrations (version, name, checksum, applied_at) VALUES (?, ?, ?, now())"
            ))
            .bind(migration.version)
            .bind(migration.name)
            .bind(migration.checksum())
            .execute()
            .await
            .unwrap();
    }
}

async fn count(client: &clickhouse::Client, table: &str) -> u64 {
    client.query(&format!("SELECT count() AS n FROM {table}")).fetch_one::<Count>().await.unwrap().n
}

#[tokio::test]
async fn the_admin_tables_move_to_their_database_with_every_row_and_a_broken_run_finishes() {
    let config = new_database_config("adm");
    database_before_migration_5(&config).await;
    let db = config.database.clone();
    let client = config.client();
    // Rows written where the admin tables were, as a running deployment has them.
    for (table, columns, values) in [
        (
            "orgs",
            "org_id, name, plan, rate_limit_per_min, rate_limit_burst, created_at, deleted, version",
            "('o1', 'one', 'FREE', 0, 0, now(), 0, 1), ('o2', 'two', 'STARTUP', 5, 5, now(), 0, 1)",
        ),
        (
            "api_keys",
            "key_hash, key_prefix, org_id, name, created_at, revoked, version",
            "('h1', 'tly_1', 'o1', 'k', now(), 0, 1), ('h2', 'tly_2', 'o2', 'k', now(), 1, 2)",
        ),
        ("budgets", "org_id, monthly_limit_nanos, alert_thresholds, version", "('o1', 5, [50], 1)"),
    ] {
        client
            .query(&format!("INSERT INTO {db}.{table} ({columns}) VALUES {values}"))
            .execute()
            .await
            .unwrap();
    }
    // A runner that died after moving the first table, before recording the migration.
    let admin = tally_schemas::migrations::admin_database(&db);
    client.query(&format!("CREATE DATABASE IF NOT EXISTS {admin}")).execute().await.unwrap();
    client.query(&format!("RENAME TABLE {db}.orgs TO {admin}.orgs")).execute().await.unwrap();

    assert_eq!(migrate(&config).await.unwrap(), [5], "the next run finishes migration 5");
    for (table, rows) in [("orgs", 2), ("api_keys", 2), ("budgets", 1)] {
        assert_eq!(config.table(table), format!("{admin}.{table}"));
        assert_eq!(count(&client, &config.table(table)).await, rows, "{table} kept every row");
        let left: Count = client
            .query("SELECT count() AS n FROM system.tables WHERE database = ? AND name = ?")
            .bind(db.as_str())
            .bind(table)
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(left.n, 0, "{table} is gone from {db}");
    }
    assert_eq!(config.table("model_prices"), format!("{db}.model_prices"));
    // A later run applies nothing.
    assert!(migrate(&config).await.unwrap().is_empty());
    drop_database(&config).await;
}
