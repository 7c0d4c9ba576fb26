//! The ingest load generator. Pre-builds request bodies (seed-000 SDK batches of ~300-byte events),
//! keeps one HTTP/1.1 keep-alive connection per worker, and drives either
//! - an open model (`--rate R`): requests are scheduled at R per second whatever the server does,
//!   and each latency is measured from its scheduled start, so a slow server cannot hide its
//!   queueing (no coordinated omission); or
//! - a closed model (`--rate 0`): every connection sends its next request as soon as the previous
//!   answered, which finds the maximum throughput.
//!
//! It prints one JSON line: requests and events per second, latency percentiles from an HDR
//! histogram, and counts per status code. The loop is bounded by `--duration` and stops by itself.
//!
//! With `--method GET` it drives a read endpoint instead (`make bench-query`), each request with
//! the next key of `--keys-file` (a JSON array of API keys: many orgs, as real readers are).
//! `make up` sends its demo traffic with it; the SREs' k6 scenarios live in `loadtest/k6/`.
//!
//! Usage: tally-loadgen --url URL --key KEY [--events N] [--rate R] [--connections C]
//!                      [--duration SECONDS] [--bodies K] [--path /v1/ingest]
//!                      [--method POST|GET] [--keys-file FILE] [--series FILE]
//!
//! `--series FILE` also writes one JSON object per second of the run (by intended start): requests,
//! 2xx answers, p50/p99 latency; `loadtest/plot.py` draws it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

struct Args {
    url: String,
    key: String,
    path: String,
    events: usize,
    rate: f64,
    connections: usize,
    duration: Duration,
    bodies: usize,
    method: hyper::Method,
    /// One key per request in turn; `--key` when empty.
    keys: Vec<String>,
    /// Where the per-second series goes, if anywhere.
    series: Option<std::path::PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        url: "http://127.0.0.1:8080".into(),
        key: String::new(),
        path: "/v1/ingest".into(),
        events: 100,
        rate: 0.0,
        connections: 32,
        duration: Duration::from_secs(10),
        bodies: 64,
        method: hyper::Method::POST,
        keys: Vec::new(),
        series: None,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let value = iter.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => args.url = value,
            "--key" => args.key = value,
            "--path" => args.path = value,
            "--events" => args.events = value.parse()?,
            "--rate" => args.rate = value.parse()?,
            "--connections" => args.connections = value.parse()?,
            "--duration" => args.duration = Duration::from_secs_f64(value.parse()?),
            "--bodies" => args.bodies = value.parse()?,
            "--method" => args.method = value.parse()?,
            "--keys-file" => args.keys = serde_json::from_slice(&std::fs::read(&value)?)?,
            "--series" => args.series = Some(value.into()),
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    anyhow::ensure!(args.events >= 1 && args.connections >= 1 && args.bodies >= 1, "counts must be positive");
    anyhow::ensure!(args.duration <= Duration::from_secs(3600), "at most an hour");
    anyhow::ensure!(
        args.method == hyper::Method::POST || args.method == hyper::Method::GET,
        "--method is POST or GET"
    );
    if args.keys.is_empty() {
        args.keys.push(args.key.clone());
    }
    Ok(args)
}

const PROVIDERS: &[(&str, &str)] = &[
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-3-5-sonnet-20241022"),
    ("ollama", "llama3"),
];

/// One SDK batch of `events` events, each about 300 bytes of JSON.
fn build_body(seed: usize, events: usize) -> Bytes {
    let now = chrono::Utc::now();
    let mut batch = Vec::with_capacity(events);
    for i in 0..events {
        let n = seed * 7919 + i * 104_729;
        let (provider, model) = PROVIDERS[n % PROVIDERS.len()];
        let prompt = 100 + n % 4000;
        let completion = 20 + n % 900;
        let timestamp = now - chrono::Duration::milliseconds((n % 3_600_000) as i64);
        let mut event = serde_json::json!({
            "timestamp": timestamp.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            "provider": provider, "model": model,
            "tokens": {"promptTokens": prompt, "completionTokens": completion, "totalTokens": prompt + completion},
            "latency": 150 + n % 5000, "status": if n.is_multiple_of(50) { "error" } else { "success" }, "error": null,
            "userId": format!("user-{}", n % 1000), "executionId": format!("exec-{}", n % 100_000),
        });
        if n.is_multiple_of(2) {
            event["cost"] = serde_json::json!((prompt as f64 * 2.5 + completion as f64 * 10.0) / 1e6);
        }
        batch.push(event);
    }
    Bytes::from(serde_json::to_vec(&serde_json::json!({ "events": batch })).unwrap_or_default())
}

struct Shared {
    started: Instant,
    histogram: Mutex<Histogram<u64>>,
    statuses: Mutex<BTreeMap<String, u64>>,
    /// Per second of the run, when `--series` asked for it.
    series: Option<Mutex<Vec<Second>>>,
}

/// One second of the run: its requests' latencies (two significant figures) and answers.
struct Second {
    latency: Histogram<u64>,
    ok: u64,
}

fn record(shared: &Shared, status: String, intended: Instant) {
    let micros = (intended.elapsed().as_micros().min(u128::from(u64::MAX)) as u64).max(1);
    let _ = shared.histogram.lock().unwrap_or_else(|e| e.into_inner()).record(micros);
    if let Some(series) = &shared.series {
        let second = intended.saturating_duration_since(shared.started).as_secs() as usize;
        let mut series = series.lock().unwrap_or_else(|e| e.into_inner());
        while series.len() <= second {
            match Histogram::new_with_bounds(1, 120_000_000, 2) {
                Ok(latency) => series.push(Second { latency, ok: 0 }),
                Err(_) => return,
            }
        }
        let _ = series[second].latency.record(micros);
        series[second].ok += u64::from(status.starts_with('2'));
    }
    *shared.statuses.lock().unwrap_or_else(|e| e.into_inner()).entry(status).or_default() += 1;
}

fn series_json(series: &[Second]) -> serde_json::Value {
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    serde_json::Value::Array(
        series
            .iter()
            .enumerate()
            .map(|(t, s)| {
                serde_json::json!({"t": t, "requests": s.latency.len(), "ok": s.ok,
                    "p50_ms": ms(&s.latency, 0.5), "p99_ms": ms(&s.latency, 0.99)})
            })
            .collect(),
    )
}

async fn worker(
    args: Arc<Args>,
    bodies: Arc<Vec<Bytes>>,
    shared: Arc<Shared>,
    schedule: Option<Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Instant>>>>,
    stop: Arc<AtomicBool>,
    index: usize,
) -> anyhow::Result<()> {
    let authority = args.url.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    let mut n = index;
    loop {
        let intended = match &schedule {
            Some(rx) => match rx.lock().await.recv().await {
                Some(at) => at,
                None => return Ok(()),
            },
            None => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                Instant::now()
            }
        };
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(&authority).await?;
            stream.set_nodelay(true)?;
            let (s, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            sender = Some(s);
        }
        let Some(active) = sender.as_mut() else { continue };
        active.ready().await?;
        let body =
            if args.method == hyper::Method::GET { Bytes::new() } else { bodies[n % bodies.len()].clone() };
        let key = &args.keys[n % args.keys.len()];
        n += 1;
        let request = Request::builder()
            .method(args.method.clone())
            .uri(format!("{}{}", args.url, args.path))
            .header("host", &authority)
            .header("content-type", "application/json")
            .header("x-api-key", key)
            .body(Full::new(body))?;
        match active.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16().to_string();
                let _ = response.into_body().collect().await;
                record(&shared, status, intended);
            }
            Err(error) => {
                record(&shared, format!("error: {error}"), intended);
                sender = None;
            }
        }
    }
}

#[global_allocator]
static GLOBAL: tally_common::alloc::Allocator = tally_common::alloc::Allocator;

/// Open model: emits each request's intended start time on schedule, `rate` per second, for
/// `duration` from `started` (a slow server does not slow the schedule down).
async fn open_model_schedule(
    tx: tokio::sync::mpsc::Sender<Instant>,
    rate: f64,
    started: Instant,
    duration: Duration,
) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now();
    while next.duration_since(started) < duration {
        tokio::time::sleep_until(next.into()).await;
        while next <= Instant::now() && next.duration_since(started) < duration {
            if tx.try_send(next).is_err() {
                break;
            }
            next += interval;
        }
    }
}

/// The run's summary as printed (one JSON line).
fn summary(
    args: &Args,
    body_bytes: usize,
    elapsed: f64,
    histogram: &Histogram<u64>,
    statuses: &BTreeMap<String, u64>,
) -> serde_json::Value {
    let ok = statuses.get("202").copied().unwrap_or(0);
    let answered_2xx: u64 = statuses.iter().filter(|(code, _)| code.starts_with('2')).map(|(_, n)| n).sum();
    serde_json::json!({
        "events_per_request": args.events,
        "body_bytes": body_bytes,
        "connections": args.connections,
        "target_rate": args.rate,
        "seconds": elapsed,
        "requests": histogram.len(),
        "requests_per_s": histogram.len() as f64 / elapsed,
        "accepted_events_per_s": (ok as usize * args.events) as f64 / elapsed,
        "latency_ms": {
            "p50": histogram.value_at_quantile(0.50) as f64 / 1000.0,
            "p90": histogram.value_at_quantile(0.90) as f64 / 1000.0,
            "p95": histogram.value_at_quantile(0.95) as f64 / 1000.0,
            "p99": histogram.value_at_quantile(0.99) as f64 / 1000.0,
            "max": histogram.max() as f64 / 1000.0,
        },
        "statuses": statuses,
        "non_2xx": histogram.len() - answered_2xx,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(parse_args()?);
    // A GET sends no body.
    let bodies: Arc<Vec<Bytes>> = Arc::new(if args.method == hyper::Method::GET {
        vec![Bytes::new()]
    } else {
        (0..args.bodies).map(|seed| build_body(seed, args.events)).collect()
    });
    let body_bytes: usize = bodies.iter().map(Bytes::len).sum::<usize>() / bodies.len();
    let started = Instant::now();
    let shared = Arc::new(Shared {
        started,
        series: args.series.as_ref().map(|_| Mutex::new(Vec::new())),
        histogram: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?),
        statuses: Mutex::new(BTreeMap::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (schedule_tx, schedule) = if args.rate > 0.0 {
        let (tx, rx) = tokio::sync::mpsc::channel::<Instant>(1_000_000);
        (Some(tx), Some(Arc::new(tokio::sync::Mutex::new(rx))))
    } else {
        (None, None)
    };
    let workers: Vec<_> = (0..args.connections)
        .map(|i| {
            tokio::spawn(worker(
                Arc::clone(&args),
                Arc::clone(&bodies),
                Arc::clone(&shared),
                schedule.clone(),
                Arc::clone(&stop),
                i,
            ))
        })
        .collect();
    match schedule_tx {
        Some(tx) => open_model_schedule(tx, args.rate, started, args.duration).await,
        None => {
            tokio::time::sleep(args.duration).await;
            stop.store(true, Ordering::Relaxed);
        }
    }
    for handle in workers {
        // Bounded: a worker stuck on a dead server is abandoned after 30 s.
        let _ = tokio::time::timeout(Duration::from_secs(30), handle).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let histogram = shared.histogram.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let statuses = shared.statuses.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let answered_2xx: u64 = statuses.iter().filter(|(code, _)| code.starts_with('2')).map(|(_, n)| n).sum();
    let summary = summary(&args, body_bytes, elapsed, &histogram, &statuses);
    println!("{summary}");
    if let (Some(path), Some(series)) = (&args.series, &shared.series) {
        let series = series_json(&series.lock().unwrap_or_else(|e| e.into_inner()));
        std::fs::write(path, serde_json::to_vec(&series)?)?;
    }
    anyhow::ensure!(answered_2xx > 0, "no request was answered 2xx: {statuses:?}");
    Ok(())
}
