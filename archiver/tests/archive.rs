//! The archiver against the real local ClickHouse and object stores (a local directory and the
//! stack's S3 server): closed months archived and read back exactly, re-runs idempotent, two
//! archivers archiving a month once, retention dropping only archived closed months, and a
//! corrupted file reported and blocking the drop.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::Arc;

use arrow_schema::{DataType, TimeUnit};
use chrono::{DateTime, Utc};
use object_store::aws::AmazonS3Builder;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tally_archiver::archive::{self, Outcome};
use tally_archiver::config::ArchiverConfig;
use tally_archiver::manifest::{Dropped, Manifest};
use tally_archiver::month::Month;
use tally_archiver::source;
use tally_archiver::store::Archive;
use tally_common::ch::ChConfig;
use tally_common::config::Env;
use tally_schemas::event::{CostSource, Status};
use tally_schemas::EventRow;
use tally_testkit::{drop_database, migrated_database, s3_bucket as bucket, s3_endpoint, unique_name};

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

/// "Now" for the tests: 2026-11-30, when August and September are closed and October is not.
fn now() -> DateTime<Utc> {
    at("2026-11-30T12:00:00Z")
}

fn config(clickhouse: &ChConfig, archive_url: &str, hot_months: Option<u32>) -> ArchiverConfig {
    let mut env = Env::from_pairs([
        ("TALLY_CLICKHOUSE_URL", clickhouse.url.clone()),
        ("TALLY_CLICKHOUSE_DATABASE", clickhouse.database.clone()),
        ("TALLY_ARCHIVE_URL", archive_url.to_owned()),
        // Small files and chunks, so a test month spans several of each.
        ("TALLY_ARCHIVE_FILE_ROWS", "700".to_owned()),
        ("TALLY_ARCHIVE_CHUNK_ROWS", "300".to_owned()),
        ("TALLY_ARCHIVE_DROP_GRACE_S", "0".to_owned()),
    ]);
    if let Some(hot) = hot_months {
        env = env.with("TALLY_ARCHIVE_HOT_MONTHS", hot.to_string());
    }
    ArchiverConfig::from_env(&env).unwrap()
}

/// `count` events of three orgs spread over `month`, deterministic.
fn rows(month: Month, count: u32, seed: u32) -> Vec<EventRow> {
    let start = month.start().timestamp() as u32;
    let span = (month.end().timestamp() - month.start().timestamp()) as u32;
    (0..count)
        .map(|i| {
            let n = i.wrapping_mul(2_654_435_761).wrapping_add(seed);
            EventRow {
                org_id: format!("org-{}", n % 3),
                event_id: uuid::Uuid::from_u128(u128::from(n) << 64 | u128::from(i) | u128::from(seed) << 32),
                timestamp: start + n % span,
                timestamp_ms: (n % 1000) as u16,
                received_at: start + n % span,
                provider: "openai".into(),
                model: ["gpt-4o", "gpt-4o-mini"][(n % 2) as usize].into(),
                prompt_tokens: n % 5000,
                completion_tokens: n % 700,
                total_tokens: n % 5000 + n % 700,
                cost_nanos: 1_000_003 + i64::from(n % 90_000) * 7_919,
                cost_source: if n % 2 == 0 { CostSource::Client } else { CostSource::Computed },
                latency_ms: n % 3000,
                status: if n % 7 == 0 { Status::Error } else { Status::Success },
                http_status: 200,
                error: String::new(),
                execution_id: format!("exec-{}", n % 17),
                agent_id: String::new(),
                user_id: format!("user-{}", n % 5),
                service: "svc".into(),
                action: String::new(),
                request_id: String::new(),
                input_bytes: u64::from(n % 10_000),
                output_bytes: u64::from(n % 20_000),
                metadata_keys: vec!["env".into()],
                metadata_values: vec![["prod", "dev"][(n % 2) as usize].into()],
                kafka_partition: (n % 4) as u16,
                kafka_offset: u64::from(i),
                kafka_index: seed,
            }
        })
        .collect()
}

async fn insert(clickhouse: &ChConfig, rows: Vec<EventRow>) {
    source::insert(clickhouse, &clickhouse.table("events"), rows).await.unwrap();
}

fn month(text: &str) -> Month {
    Month::parse(text).unwrap()
}

/// A database with 1000 events in each of August, September and November 2026.
async fn database_with_three_months(prefix: &str) -> ChConfig {
    let clickhouse = migrated_database(prefix).await;
    for (seed, m) in [(1, "2026-08"), (2, "2026-09"), (3, "2026-11")] {
        insert(&clickhouse, rows(month(m), 1000, seed)).await;
    }
    clickhouse
}

fn outcomes(reports: &[archive::MonthReport]) -> Vec<(String, Outcome)> {
    reports.iter().map(|r| (r.month.clone(), r.outcome.clone())).collect()
}

fn local_archive_url() -> (String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(unique_name("archive"));
    (format!("file://{}", dir.display()), dir)
}

#[tokio::test]
async fn closed_months_are_archived_read_back_exactly_and_a_rerun_adds_nothing() {
    let clickhouse = database_with_three_months("arch").await;
    let (url, dir) = local_archive_url();
    let config = config(&clickhouse, &url, None);
    let store = Archive::open(&config).unwrap();
    // A file an interrupted run left behind, under the name the run will use: not part of the
    // archive (no manifest names it), and replaced.
    std::fs::create_dir_all(dir.join("events/year=2026/month=08")).unwrap();
    std::fs::write(dir.join("events/year=2026/month=08/v0001-part-00000.parquet"), b"half a file").unwrap();

    let reports = archive::run(&config, &store, now()).await.unwrap();
    let got = outcomes(&reports);
    assert_eq!(got.len(), 3, "{got:?}");
    for (index, m) in ["2026-08", "2026-09"].iter().enumerate() {
        assert!(
            matches!(&got[index], (name, Outcome::Archived { version: 1, rows: 1000, files: 2, .. }) if name == m),
            "{got:?}"
        );
        let manifest = Manifest::latest(&store, month(m)).await.unwrap().unwrap();
        assert_eq!(manifest.orgs, source::sums(&clickhouse, month(m)).await.unwrap(), "exact per org");
        assert_eq!(manifest.files.iter().map(|f| f.rows).sum::<u64>(), 1000);
        assert_eq!(manifest.source.partition, month(m).partition());
    }
    assert_eq!(got[2], ("2026-11".into(), Outcome::Open), "the current month is not closed");

    // The files are Parquet with the types a reader expects, sorted by org then time.
    let manifest = Manifest::latest(&store, month("2026-08")).await.unwrap().unwrap();
    let file = std::fs::File::open(dir.join(&manifest.files[0].path)).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = reader.schema().clone();
    assert_eq!(
        schema.field_with_name("timestamp").unwrap().data_type(),
        &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
    );
    assert_eq!(schema.field_with_name("cost").unwrap().data_type(), &DataType::Decimal128(18, 9));
    assert_eq!(schema.field_with_name("event_id").unwrap().data_type(), &DataType::FixedSizeBinary(16));
    let parquet_schema = format!("{:?}", reader.parquet_schema().columns());
    assert!(parquet_schema.contains("Timestamp") && parquet_schema.contains("Decimal"), "{parquet_schema}");
    let metadata = reader.metadata().clone();
    assert!(metadata.row_group(0).column(0).statistics().is_some(), "statistics are written");
    let first = metadata.row_group(0).column(0);
    assert!(
        first.column_index_offset().is_some() && first.offset_index_offset().is_some(),
        "page indexes are written"
    );
    assert_eq!(metadata.file_metadata().num_rows(), 700);
    let mut previous: Option<(String, i64)> = None;
    for batch in reader.build().unwrap() {
        let batch = batch.unwrap();
        let orgs = arrow_array::cast::AsArray::as_string::<i32>(batch.column(0));
        let times = arrow_array::cast::AsArray::as_primitive::<arrow_array::types::TimestampMillisecondType>(
            batch.column(2),
        );
        for i in 0..batch.num_rows() {
            let key = (orgs.value(i).to_owned(), times.value(i));
            if let Some(previous) = &previous {
                assert!(*previous <= key, "sorted by org then time: {previous:?} > {key:?}");
            }
            previous = Some(key);
        }
    }

    // A second pass finds nothing to do; `verify` checks every manifest.
    let again = outcomes(&archive::run(&config, &store, now()).await.unwrap());
    assert_eq!(again[0], ("2026-08".into(), Outcome::UpToDate { version: 1 }));
    assert_eq!(again[1], ("2026-09".into(), Outcome::UpToDate { version: 1 }));
    let verified = archive::verify_all(&store).await.unwrap();
    assert_eq!(verified, [("2026-08".to_owned(), Ok(1)), ("2026-09".to_owned(), Ok(1))]);
    drop_database(&clickhouse).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn two_archivers_at_once_archive_a_month_once() {
    let clickhouse = database_with_three_months("arch2").await;
    let (url, dir) = local_archive_url();
    let config = config(&clickhouse, &url, None);
    let store = Archive::open(&config).unwrap();
    let (a, b) = tokio::join!(archive::run(&config, &store, now()), archive::run(&config, &store, now()));
    let all: Vec<Outcome> =
        outcomes(&a.unwrap()).into_iter().chain(outcomes(&b.unwrap())).map(|(_, o)| o).collect();
    let archived = all.iter().filter(|o| matches!(o, Outcome::Archived { .. })).count();
    assert_eq!(archived, 2, "August and September once each: {all:?}");
    for m in ["2026-08", "2026-09"] {
        let keys: Vec<String> =
            store.list(&month(m).prefix()).await.unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys.iter().filter(|k| k.contains("manifest-")).count(), 1, "{keys:?}");
    }
    drop_database(&clickhouse).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn retention_drops_only_archived_closed_months_and_keeps_rows_that_came_later() {
    let clickhouse = database_with_three_months("arch3").await;
    let (url, dir) = local_archive_url();
    // One hot month before the current one: October stays, August and September may go.
    let config = config(&clickhouse, &url, Some(1));
    let store = Archive::open(&config).unwrap();
    let daily_before = rollup_rows(&clickhouse).await;
    let got = outcomes(&archive::run(&config, &store, now()).await.unwrap());
    assert_eq!(got[0], ("2026-08".into(), Outcome::DroppedNow { version: 1, rows: 1000 }));
    assert_eq!(got[1], ("2026-09".into(), Outcome::DroppedNow { version: 1, rows: 1000 }));
    assert_eq!(got[2], ("2026-11".into(), Outcome::Open));
    assert!(source::sums(&clickhouse, month("2026-08")).await.unwrap().is_empty(), "the partition is gone");
    assert_eq!(rollup_rows(&clickhouse).await, daily_before, "the rollups keep the dropped months");
    assert_eq!(source::months(&clickhouse).await.unwrap(), [month("2026-11")]);

    // `restore` brings August back exactly once, without touching the rollups; readers take it
    // from ClickHouse again (no drop record).
    let august = month("2026-08");
    assert_eq!(Dropped::read(&store, august).await.unwrap().unwrap().version, 1);
    let restored = archive::restore(&config, &store, august).await.unwrap();
    assert_eq!(restored, Outcome::Restored { version: 1, rows: 1000 });
    assert!(Dropped::read(&store, august).await.unwrap().is_none());
    let manifest = Manifest::latest(&store, august).await.unwrap().unwrap();
    assert_eq!(source::sums(&clickhouse, august).await.unwrap(), manifest.orgs, "every row back, exactly");
    assert_eq!(
        archive::restore(&config, &store, august).await.unwrap(),
        Outcome::UpToDate { version: 1 },
        "once"
    );
    assert_eq!(rollup_rows(&clickhouse).await, daily_before, "the rollups did not count it twice");
    let august_rows: Vec<EventRow> = clickhouse
        .client()
        .query(&format!(
            "SELECT {} FROM {} WHERE toYYYYMM(timestamp) = 202608 ORDER BY kafka_offset",
            tally_schemas::row::select_list(),
            clickhouse.table("events")
        ))
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(august_rows, rows(august, 1000, 1), "the restored rows are the rows archived, field by field");
    source::drop_partition(&clickhouse, august).await.unwrap();

    // A row for September arrives after the drop (a dead-letter replay): the next pass archives it
    // as a new version and, September being cold, drops it again.
    insert(&clickhouse, rows(month("2026-09"), 1, 99)).await;
    let got = outcomes(&archive::run(&config, &store, now()).await.unwrap());
    assert_eq!(got[0], ("2026-09".into(), Outcome::DroppedNow { version: 2, rows: 1 }), "{got:?}");
    let september = Manifest::latest(&store, month("2026-09")).await.unwrap().unwrap();
    assert_eq!(september.totals.rows, 1001);
    assert!(source::sums(&clickhouse, month("2026-09")).await.unwrap().is_empty());
    drop_database(&clickhouse).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn late_rows_are_archived_once_as_a_new_version_never_lost_or_doubled() {
    let clickhouse = database_with_three_months("arch7").await;
    let (url, dir) = local_archive_url();
    let keep = config(&clickhouse, &url, None);
    let store = Archive::open(&keep).unwrap();
    let september = month("2026-09");
    archive::run(&keep, &store, now()).await.unwrap();

    // Five rows reach September after it was archived (still in ClickHouse): version 2 names the
    // first version's files and one more holding exactly the five.
    insert(&clickhouse, rows(september, 5, 50)).await;
    let got = outcomes(&archive::run(&keep, &store, now()).await.unwrap());
    assert!(
        matches!(&got[1], (m, Outcome::Archived { version: 2, rows: 5, files: 1, .. }) if m == "2026-09"),
        "{got:?}"
    );
    let v1 = Manifest::read(&store, september, 1).await.unwrap();
    let v2 = Manifest::latest(&store, september).await.unwrap().unwrap();
    assert_eq!(v2.files[..v1.files.len()], v1.files[..], "the first version's files, unchanged");
    assert_eq!(v2.files.len(), v1.files.len() + 1);
    assert_eq!(v2.files.last().unwrap().rows, 5);
    assert_eq!(v2.orgs, source::sums(&clickhouse, september).await.unwrap(), "exact per org");
    assert_eq!(
        outcomes(&archive::run(&keep, &store, now()).await.unwrap())[1].1,
        Outcome::UpToDate { version: 2 }
    );

    // Retention drops both closed months, recording the drop.
    let cold = config(&clickhouse, &url, Some(1));
    let got = outcomes(&archive::run(&cold, &store, now()).await.unwrap());
    assert_eq!(got[1], ("2026-09".into(), Outcome::DroppedNow { version: 2, rows: 1005 }), "{got:?}");
    let dropped = Dropped::read(&store, september).await.unwrap().unwrap();
    assert_eq!((dropped.version, dropped.rows_dropped), (2, 1005));

    // After the drop: three new rows, and one already archived written again (an operator
    // re-inserting a backup). The three are archived as version 3, the fourth is recognised by
    // its identity and not archived twice; then the month is dropped again.
    insert(&clickhouse, rows(september, 3, 60)).await;
    insert(&clickhouse, rows(september, 1, 2)).await;
    let got = outcomes(&archive::run(&cold, &store, now()).await.unwrap());
    assert_eq!(got[0], ("2026-09".into(), Outcome::DroppedNow { version: 3, rows: 4 }), "{got:?}");
    let v3 = Manifest::latest(&store, september).await.unwrap().unwrap();
    assert_eq!((v3.version, v3.totals.rows), (3, 1008), "1000 + 5 + 3, each once");
    let mut expected = tally_archiver::totals::OrgSums::new();
    for row in rows(september, 1000, 2).iter().chain(&rows(september, 5, 50)).chain(&rows(september, 3, 60)) {
        let sums = expected.entry(row.org_id.clone()).or_default();
        sums.add(&tally_archiver::totals::Sums {
            rows: 1,
            cost_nanos: row.cost_nanos,
            prompt_tokens: u64::from(row.prompt_tokens),
            completion_tokens: u64::from(row.completion_tokens),
            total_tokens: u64::from(row.total_tokens),
        });
    }
    assert_eq!(v3.orgs, expected, "the archive holds every row inserted, once");
    assert_eq!(archive::verify_all(&store).await.unwrap()[1], ("2026-09".to_owned(), Ok(3)));
    assert!(source::sums(&clickhouse, september).await.unwrap().is_empty());
    drop_database(&clickhouse).await;
    let _ = std::fs::remove_dir_all(dir);
}

async fn rollup_rows(clickhouse: &ChConfig) -> u64 {
    clickhouse
        .client()
        .query(&format!("SELECT toUInt64(countMerge(events)) FROM {}", clickhouse.table("rollup_daily")))
        .fetch_one()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_corrupted_file_is_reported_by_verify_and_blocks_the_drop() {
    let clickhouse = database_with_three_months("arch4").await;
    let (url, dir) = local_archive_url();
    let store = Archive::open(&config(&clickhouse, &url, None)).unwrap();
    archive::run(&config(&clickhouse, &url, None), &store, now()).await.unwrap();
    let manifest = Manifest::latest(&store, month("2026-08")).await.unwrap().unwrap();
    let damaged = dir.join(&manifest.files[1].path);
    let bytes = std::fs::read(&damaged).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();

    let verified = archive::verify_all(&store).await.unwrap();
    let (m, result) = &verified[0];
    let reason = result.as_ref().unwrap_err();
    assert_eq!(m, "2026-08");
    assert!(reason.contains(&manifest.files[1].path) && reason.contains("SHA-256"), "{reason}");
    assert_eq!(verified[1], ("2026-09".to_owned(), Ok(1)));

    let got = outcomes(&archive::run(&config(&clickhouse, &url, Some(1)), &store, now()).await.unwrap());
    assert!(
        matches!(&got[0], (m, Outcome::Failed { reason }) if m == "2026-08" && reason.contains("SHA-256")),
        "{got:?}"
    );
    assert_eq!(got[1], ("2026-09".into(), Outcome::DroppedNow { version: 1, rows: 1000 }));
    assert_eq!(
        source::sums(&clickhouse, month("2026-08")).await.unwrap().values().map(|s| s.rows).sum::<u64>(),
        1000,
        "kept"
    );
    drop_database(&clickhouse).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn archives_to_the_s3_server_and_fails_cleanly_when_it_refuses() {
    let clickhouse = database_with_three_months("arch5").await;
    let name = unique_name("arch").replace('_', "-");
    assert_eq!(bucket("PUT", &name), 200);
    let s3 = |secret: &str| {
        Archive::on(
            Arc::new(
                AmazonS3Builder::new()
                    .with_endpoint(s3_endpoint())
                    .with_bucket_name(&name)
                    .with_region("us-east-1")
                    .with_access_key_id("tally")
                    .with_secret_access_key(secret)
                    .with_allow_http(true)
                    .with_virtual_hosted_style_request(false)
                    .build()
                    .unwrap(),
            ),
            &format!("s3://{name}"),
        )
    };
    let config = config(&clickhouse, "file:///unused", None);
    // Wrong credentials: every closed month fails with the store's reason; nothing is published.
    let refused = outcomes(&archive::run(&config, &s3("not-the-secret"), now()).await.unwrap());
    assert!(
        matches!(&refused[0].1, Outcome::Failed { reason } if reason.contains("archive store")),
        "{refused:?}"
    );
    let store = s3("tally-dev-secret");
    assert!(Manifest::latest(&store, month("2026-08")).await.unwrap().is_none());
    // With the right ones, the run succeeds and reads back exactly.
    let got = outcomes(&archive::run(&config, &store, now()).await.unwrap());
    assert!(matches!(got[0].1, Outcome::Archived { version: 1, rows: 1000, .. }), "{got:?}");
    assert_eq!(archive::verify_all(&store).await.unwrap().len(), 2);
    drop_database(&clickhouse).await;
}

#[tokio::test]
async fn serve_runs_passes_and_reports_them_on_its_ops_routes() {
    let clickhouse = database_with_three_months("arch6").await;
    let (url, dir) = local_archive_url();
    let mut config = config(&clickhouse, &url, None);
    config.interval = std::time::Duration::from_millis(200);
    let store = Archive::open(&config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(tally_archiver::serve::serve(config, store.clone(), listener, shutdown.clone()));
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://{addr}{path}")).send();
    // The passes run on the real clock: August and September 2026 are closed (November too, from
    // 2027-01-07 on); the metrics say what they did.
    let value = |metrics: &str, name: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    let mut metrics = String::new();
    for _ in 0..100 {
        if let Ok(response) = get("/metrics").await {
            metrics = response.text().await.unwrap();
            if value(&metrics, "tally_archiver_months{outcome=\"up_to_date\"}") >= 2.0 {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(value(&metrics, "tally_archiver_months{outcome=\"up_to_date\"}") >= 2.0, "{metrics}");
    assert!(value(&metrics, "tally_archiver_rows_archived_total") >= 2000.0, "{metrics}");
    assert!(value(&metrics, "tally_archiver_last_success_timestamp_seconds") > 1.7e9, "{metrics}");
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    assert!(Manifest::latest(&store, month("2026-09")).await.unwrap().is_some());
    shutdown.cancel();
    task.await.unwrap().unwrap();
    drop_database(&clickhouse).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `tally-archiver run`, the real binary, on `database` archiving to the S3 bucket `bucket`
/// through `endpoint`: small files so a month spans several, a short lock timeout and S3 retry.
/// The secret key comes from a file (`TALLY_S3_SECRET_ACCESS_KEY_FILE`, as Kubernetes mounts it).
fn archiver_binary(clickhouse: &ChConfig, bucket: &str, endpoint: &str) -> tokio::process::Command {
    let secret = std::env::temp_dir().join(format!("{bucket}.s3-secret"));
    std::fs::write(&secret, format!("{}\n", tally_testkit::S3_SECRET_KEY)).unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally-archiver"));
    command
        .arg("run")
        .env("TALLY_CLICKHOUSE_URL", &clickhouse.url)
        .env("TALLY_CLICKHOUSE_DATABASE", &clickhouse.database)
        .env("TALLY_ARCHIVE_URL", format!("s3://{bucket}"))
        .env("TALLY_S3_ENDPOINT", endpoint)
        .env("TALLY_S3_ACCESS_KEY_ID", tally_testkit::S3_ACCESS_KEY)
        .env("TALLY_S3_SECRET_ACCESS_KEY_FILE", &secret)
        .env("TALLY_ARCHIVE_FILE_ROWS", "4000")
        .env("TALLY_ARCHIVE_CHUNK_ROWS", "2000")
        .env("TALLY_ARCHIVE_LOCK_STALE_S", "2")
        .env("TALLY_ARCHIVE_S3_RETRY_TIMEOUT_S", "1")
        .env("TALLY_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn lock_tables(clickhouse: &ChConfig) -> Vec<String> {
    clickhouse
        .client()
        .query("SELECT name FROM system.tables WHERE database = ? AND name LIKE 'archiver_lock_%'")
        .bind(clickhouse.database.as_str())
        .fetch_all()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_run_killed_mid_upload_or_cut_off_from_s3_publishes_nothing_and_a_rerun_archives_once() {
    use tokio::io::AsyncBufReadExt;
    let clickhouse = migrated_database("arch8").await;
    let august = month("2026-08");
    insert(&clickhouse, rows(august, 30_000, 8)).await;
    let name = unique_name("arch").replace('_', "-");
    assert_eq!(bucket("PUT", &name), 200);
    let store = Archive::on(
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(s3_endpoint())
                .with_bucket_name(&name)
                .with_region("us-east-1")
                .with_access_key_id(tally_testkit::S3_ACCESS_KEY)
                .with_secret_access_key(tally_testkit::S3_SECRET_KEY)
                .with_allow_http(true)
                .with_virtual_hosted_style_request(false)
                .build()
                .unwrap(),
        ),
        &format!("s3://{name}"),
    );

    // S3 unreachable (nothing listens there): a clean failure naming the store, exit 1, nothing
    // published, the lock released.
    let down = archiver_binary(&clickhouse, &name, "http://127.0.0.1:9").output().await.unwrap();
    let stdout = String::from_utf8_lossy(&down.stdout);
    assert_eq!(down.status.code(), Some(1), "{stdout}");
    let report = stdout.lines().find(|l| l.contains("\"month\":\"2026-08\"")).unwrap();
    assert!(report.contains("\"outcome\":\"failed\"") && report.contains("archive store"), "{report}");
    assert!(store.list("events/").await.unwrap().is_empty());
    assert!(lock_tables(&clickhouse).await.is_empty(), "the lock was released");

    // Killed (SIGKILL) right after its first file was uploaded: no manifest, a stale lock.
    let mut child = archiver_binary(&clickhouse, &name, &s3_endpoint()).spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut uploaded = false;
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.contains("uploaded") {
            uploaded = true;
            break;
        }
    }
    assert!(uploaded, "the run uploaded a file before it could be killed");
    child.kill().await.unwrap();
    let keys: Vec<String> = store.list("events/").await.unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(!keys.is_empty() && keys.iter().all(|k| !k.contains("manifest")), "{keys:?}");
    assert_eq!(lock_tables(&clickhouse).await.len(), 1, "the killed run's lock is left");

    // The re-run takes the stale lock over and archives the month once, exactly.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let again = archiver_binary(&clickhouse, &name, &s3_endpoint()).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert_eq!(again.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("\"outcome\":\"archived\",\"version\":1,\"rows\":30000"), "{stdout}");
    let manifest = Manifest::latest(&store, august).await.unwrap().unwrap();
    assert_eq!(manifest.orgs, source::sums(&clickhouse, august).await.unwrap());
    assert_eq!(manifest.files.iter().map(|f| f.rows).sum::<u64>(), 30_000, "no row twice");
    let named: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    // (S3Proxy's filesystem backend also lists its directories as objects.)
    for (key, _) in store.list("events/").await.unwrap().into_iter().filter(|(k, _)| k.ends_with(".parquet"))
    {
        assert!(named.contains(&key.as_str()), "orphan {key}");
    }
    assert_eq!(archive::verify_all(&store).await.unwrap(), [("2026-08".to_owned(), Ok(1))]);
    assert!(lock_tables(&clickhouse).await.is_empty());
    drop_database(&clickhouse).await;
}
