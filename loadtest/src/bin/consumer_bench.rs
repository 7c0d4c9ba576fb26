//! `tally-consumer-bench`: the tools `make bench-consumer` drives (loadtest/bench_consumer.py).
//!
//! - `migrate DATABASE`: applies Tally's migrations to DATABASE (events, rollups, admin tables).
//! - `preload TOPIC EVENTS [PER_RECORD] [FORMAT] [NOW_MS]`: produces EVENTS synthetic events to TOPIC
//!   as the ingest does (one record per request of PER_RECORD events of one org, keyed by org, lz4,
//!   acks=all), in FORMAT (`JSONEachRow`, the default, or `RowBinary`, as `TALLY_RECORD_FORMAT`),
//!   their times before NOW_MS (default: now; give another preload's to write the same events).
//! - `ceiling DATABASE EVENTS [BATCH] [PER_RECORD] [NOW_MS]`: the raw ceiling: the rows `preload`
//!   wrote (given its PER_RECORD and the NOW_MS it printed), written in RowBinary as the consumer
//!   writes them before the clock starts, then inserted into DATABASE.events as the consumer inserts
//!   (one INSERT per BATCH rows, streamed in 256 KiB chunks, one at a time): no Kafka, no decoding.
//!
//! - `load DATABASE EVENTS DAYS`: the query benchmark's bulk loader: EVENTS rows of 1000 orgs with
//!   event times advancing evenly over the last DAYS days (as if they had arrived live), inserted into DATABASE.events (and so into the
//!   rollups) 100 000 rows per INSERT, as the consumer writes them.
//! - `load-month DATABASE EVENTS YYYY-MM`: the same into one calendar month (the archiver's
//!   benchmark).
//!
//! Prints one JSON line of figures. Settings: TALLY_KAFKA_BROKERS, TALLY_CLICKHOUSE_URL.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tally_common::ch::ChConfig;
use tally_common::config::Env;
use tally_schemas::record::{
    RecordFormat, HEADER_EVENTS, HEADER_FORMAT, HEADER_REQUEST_ID, HEADER_SCHEMA_VERSION, SCHEMA_VERSION,
};
use tally_schemas::row::write_row_binary;
use tally_schemas::EventRow;
use tally_schemas::{CostSource, Event, Status};

#[global_allocator]
static GLOBAL: tally_common::alloc::Allocator = tally_common::alloc::Allocator;

const MODELS: &[(&str, &str)] = &[
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-3-5-sonnet-20241022"),
    ("ollama", "llama3"),
];
const ORGS: u64 = 1000;

/// Event `index` of record `record`: the org is the record's, the rest varies per event. Times
/// spread over the `span_ms` before `now_ms` (an hour: one or two monthly partitions, like live
/// traffic).
fn synthetic_event(record: u64, index: u64, now_ms: i64) -> Event {
    spread_event(record, index, now_ms, 3_600_000, 7)
}

/// As `synthetic_event`, over `span_ms` and `services` services.
fn spread_event(record: u64, index: u64, now_ms: i64, span_ms: u64, services: u64) -> Event {
    let n = record.wrapping_mul(7919).wrapping_add(index.wrapping_mul(104_729));
    let (provider, model) = MODELS[(n % MODELS.len() as u64) as usize];
    let prompt = 100 + (n % 4000) as u32;
    let completion = 20 + (n % 900) as u32;
    Event {
        event_id: uuid::Uuid::from_u64_pair(record, index),
        org_id: format!("org-{:04}", record % ORGS),
        received_at_ms: now_ms,
        timestamp_ms: now_ms
            - (if span_ms == 3_600_000 { n % span_ms } else { n.wrapping_mul(2_654_435_761) % span_ms })
                as i64,
        provider: provider.into(),
        model: model.into(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cost_nanos: i64::from(prompt) * 2500 + i64::from(completion) * 10_000,
        cost_source: if n.is_multiple_of(2) { CostSource::Client } else { CostSource::Computed },
        latency_ms: 150 + (n % 5000) as u32,
        status: if n.is_multiple_of(50) { Status::Error } else { Status::Success },
        http_status: if n.is_multiple_of(50) { 429 } else { 200 },
        error: if n.is_multiple_of(50) { "rate limited by provider".into() } else { String::new() },
        execution_id: format!("exec-{}", n % 100_000),
        agent_id: String::new(),
        user_id: format!("user-{}", n % 1000),
        service: format!("svc-{}", n % services),
        action: "chat.completion".into(),
        request_id: format!("req-{record}"),
        input_bytes: u64::from(prompt) * 4,
        output_bytes: u64::from(completion) * 4,
        metadata: vec![("env".into(), "prod".into())],
    }
}

fn arg<T: std::str::FromStr>(args: &[String], index: usize, default: Option<T>) -> anyhow::Result<T> {
    match args.get(index) {
        Some(value) => value.parse().map_err(|_| anyhow::anyhow!("bad argument {index}: {value}")),
        None => default.ok_or_else(|| anyhow::anyhow!("missing argument {index}; see the file's doc")),
    }
}

async fn preload(
    env: &Env,
    topic: &str,
    events: u64,
    per_record: u64,
    format: RecordFormat,
    now_ms: Option<i64>,
) -> anyhow::Result<serde_json::Value> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", env.string("TALLY_KAFKA_BROKERS", "127.0.0.1:9092"))
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("linger.ms", "20")
        .set("batch.size", "1048576")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()?;
    let now_ms = now_ms.unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    let started = Instant::now();
    let records = events.div_ceil(per_record);
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut bytes = 0usize;
    for record in 0..records {
        let count = per_record.min(events - record * per_record);
        let mut payload = Vec::with_capacity(count as usize * 600);
        for index in 0..count {
            format.encode(&synthetic_event(record, index, now_ms), &mut payload);
        }
        bytes += payload.len();
        let key = format!("org-{:04}", record % ORGS);
        let producer = producer.clone();
        let topic = topic.to_owned();
        in_flight.push(async move {
            // The headers the ingest writes on an events record.
            let (request_id, events) = (format!("bench-{record}"), count.to_string());
            let mut headers = OwnedHeaders::new()
                .insert(Header { key: HEADER_SCHEMA_VERSION, value: Some(SCHEMA_VERSION) })
                .insert(Header { key: HEADER_REQUEST_ID, value: Some(request_id.as_str()) })
                .insert(Header { key: HEADER_EVENTS, value: Some(events.as_str()) });
            if format != RecordFormat::JsonEachRow {
                headers = headers.insert(Header { key: HEADER_FORMAT, value: Some(format.name()) });
            }
            let record = FutureRecord::to(&topic).key(&key).payload(&payload).headers(headers);
            producer.send(record, Duration::from_secs(60)).await.map(|_| ()).map_err(|(e, _)| e)
        });
        if in_flight.len() >= 20_000 {
            use futures::StreamExt;
            if let Some(result) = in_flight.next().await {
                result?;
            }
        }
    }
    use futures::StreamExt;
    while let Some(result) = in_flight.next().await {
        result?;
    }
    producer.flush(Duration::from_secs(60))?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(serde_json::json!({"events": events, "records": records, "payload_bytes": bytes, "seconds": seconds,
        "now_ms": now_ms, "format": format.name()}))
}

/// The raw insert ceiling for the rows `preload` wrote: the very same rows (its `now_ms` and
/// `per_record`, so the same ids, times, orgs and values), each written in RowBinary as the consumer
/// writes it (`write_row_binary`) before the clock starts, then inserted as the consumer inserts:
/// one INSERT per `batch` rows, its bytes streamed in 256 KiB chunks, one INSERT at a time. What
/// the clock sees is ClickHouse taking the rows and the client handing over bytes it already had.
/// (Until session 23 it inserted ten batches of its own generated rows over and over: 1 M distinct
/// ids, which ClickHouse ingested 15-20 % more slowly than the preloaded rows, so tally measured
/// above its "ceiling".)
async fn ceiling(
    env: &Env,
    database: &str,
    events: u64,
    batch: u64,
    per_record: u64,
    now_ms: Option<i64>,
) -> anyhow::Result<serde_json::Value> {
    const CHUNK_BYTES: usize = 256 * 1024; // the consumer's INSERT_CHUNK_BYTES
    let config = ChConfig { database: database.to_owned(), ..ChConfig::from_env(env)? };
    let client = config.client();
    let sql = format!(
        "INSERT INTO {}({}) FORMAT RowBinary",
        config.table("events"),
        tally_schemas::row::select_list()
    );
    let now_ms = now_ms.unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    let built = Instant::now();
    let mut batches: Vec<Vec<u8>> = Vec::new();
    let mut position = 0u64;
    while position < events {
        let end = events.min(position + batch);
        let mut bytes = Vec::with_capacity(((end - position) * 200) as usize);
        for at in position..end {
            let (record, index) = (at / per_record, at % per_record);
            let event = synthetic_event(record, index, now_ms);
            let kafka = ((record % 8) as i32, (record / 8) as i64, index as u32);
            write_row_binary(&event.borrowed(), kafka, &mut bytes);
        }
        batches.push(bytes);
        position = end;
    }
    let bytes: usize = batches.iter().map(Vec::len).sum();
    let build_seconds = built.elapsed().as_secs_f64();
    let started = Instant::now();
    for rows in &batches {
        let mut insert = client
            .insert_formatted_with(sql.clone())
            .with_setting("max_insert_block_size", "1048576")
            .buffered_with_capacity(CHUNK_BYTES);
        for chunk in rows.chunks(CHUNK_BYTES) {
            insert.write_buffered(chunk);
            insert.flush().await?;
        }
        insert.end().await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(serde_json::json!({"rows": events, "seconds": seconds, "rows_per_s": events as f64 / seconds,
        "row_binary_bytes": bytes, "build_seconds": build_seconds}))
}

async fn load(env: &Env, database: &str, events: u64, days: u64) -> anyhow::Result<serde_json::Value> {
    load_span(env, database, events, chrono::Utc::now().timestamp_millis(), days * 86_400_000).await
}

/// `load` into one calendar month (`YYYY-MM`): times advance evenly from its first to its last
/// millisecond.
async fn load_month(
    env: &Env,
    database: &str,
    events: u64,
    month: &str,
) -> anyhow::Result<serde_json::Value> {
    let first = chrono::NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d")?;
    let next =
        first.checked_add_months(chrono::Months::new(1)).ok_or_else(|| anyhow::anyhow!("bad month"))?;
    let start = first.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc().timestamp_millis();
    let end = next.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc().timestamp_millis();
    load_span(env, database, events, end - 1, u64::try_from(end - 1 - start)?).await
}

/// EVENTS rows with times advancing evenly over the `span_ms` before `now_ms`.
async fn load_span(
    env: &Env,
    database: &str,
    events: u64,
    now_ms: i64,
    span_ms: u64,
) -> anyhow::Result<serde_json::Value> {
    let config = ChConfig { database: database.to_owned(), ..ChConfig::from_env(env)? };
    let client = config.client();
    let table = config.table("events");
    let per_record = 100;
    let started = Instant::now();
    let mut inserted = 0u64;
    while inserted < events {
        let take = 100_000.min(events - inserted);
        let mut insert = client
            .insert_unescaped::<EventRow>(&table)
            .await?
            .with_setting("max_insert_block_size", "1048576");
        for position in inserted..inserted + take {
            let (record, index) = (position / per_record, position % per_record);
            // Two services per org: about eight rollup rows per org and hour. Event times advance
            // with the position (as live traffic arrives), so each insert covers about an hour
            // and its rollup part is as compact as in production.
            let mut event = spread_event(record, index, now_ms, span_ms, 2);
            let offset = u128::from(position) * u128::from(span_ms) / u128::from(events.max(1));
            event.timestamp_ms = now_ms - span_ms as i64 + offset as i64;
            event.received_at_ms = event.timestamp_ms + 1000;
            let row = EventRow::new(event, (record % 8) as i32, (record / 8) as i64, index as u32);
            insert.write(&row).await?;
        }
        insert.end().await?;
        inserted += take;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(serde_json::json!({"rows": inserted, "seconds": seconds, "rows_per_s": inserted as f64 / seconds}))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let env = Env::from_process()?;
    let command = args.get(1).map(String::as_str).unwrap_or_default();
    let result = match command {
        "migrate" => {
            let database: String = arg(&args, 2, None)?;
            let config = ChConfig { database, ..ChConfig::from_env(&env)? };
            let applied = tally_common::migrate::migrate(&config).await?;
            serde_json::json!({ "applied": applied })
        }
        "preload" => {
            let format = args.get(5).map_or("JSONEachRow", String::as_str);
            let format = RecordFormat::of_header(Some(format.as_bytes()))
                .ok_or_else(|| anyhow::anyhow!("FORMAT is JSONEachRow or RowBinary, not {format:?}"))?;
            let now_ms = match args.get(6) {
                Some(_) => Some(arg::<i64>(&args, 6, None)?),
                None => None,
            };
            let (topic, events) = (arg::<String>(&args, 2, None)?, arg(&args, 3, None)?);
            preload(&env, &topic, events, arg(&args, 4, Some(100))?, format, now_ms).await?
        }
        "ceiling" => {
            let now_ms = match args.get(6) {
                Some(_) => Some(arg::<i64>(&args, 6, None)?),
                None => None,
            };
            let (database, events) = (arg::<String>(&args, 2, None)?, arg(&args, 3, None)?);
            ceiling(&env, &database, events, arg(&args, 4, Some(100_000))?, arg(&args, 5, Some(100))?, now_ms).await?
        }
        "load" => load(&env, &arg::<String>(&args, 2, None)?, arg(&args, 3, None)?, arg(&args, 4, Some(30))?).await?,
        "load-month" => {
            load_month(&env, &arg::<String>(&args, 2, None)?, arg(&args, 3, None)?, &arg::<String>(&args, 4, None)?).await?
        }
        _ => anyhow::bail!("usage: tally-consumer-bench migrate DB | preload TOPIC EVENTS [PER_RECORD] [FORMAT] [NOW_MS] | ceiling DB EVENTS [BATCH] [PER_RECORD] [NOW_MS] | load DB EVENTS [DAYS] | load-month DB EVENTS YYYY-MM"),
    };
    println!("{result}");
    Ok(())
}
