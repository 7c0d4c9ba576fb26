//! The ceiling for ingest benchmarks: an axum server whose handler only reads the whole body and
//! answers 202, on the same runtime settings as the ingest. Whatever the ingest does on top of this
//! is what its benchmark figures pay for.
//!
//! `TALLY_CEILING_WORK_NS=N` makes the handler also spin for N ns of CPU per request (a calibration:
//! how much CPU per request a server with N ns of its own work shows in the same benchmark, kernel
//! and load generator included).
//!
//! Usage: tally-ceiling [ADDR]   (default 127.0.0.1:18090)

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;

static WORK: OnceLock<Duration> = OnceLock::new();

async fn ingest(body: Body) -> StatusCode {
    let work = WORK.get().copied().unwrap_or_default();
    if !work.is_zero() {
        let started = Instant::now();
        while started.elapsed() < work {
            std::hint::spin_loop();
        }
    }
    match to_bytes(body, 16 << 20).await {
        Ok(bytes) if !bytes.is_empty() => StatusCode::ACCEPTED,
        _ => StatusCode::BAD_REQUEST,
    }
}

#[global_allocator]
static GLOBAL: tally_common::alloc::Allocator = tally_common::alloc::Allocator;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18090".into());
    let work_ns = match std::env::var("TALLY_CEILING_WORK_NS") {
        Ok(text) => {
            text.parse::<u64>().map_err(|e| anyhow::anyhow!("TALLY_CEILING_WORK_NS={text:?}: {e}"))?
        }
        Err(_) => 0,
    };
    WORK.get_or_init(|| Duration::from_nanos(work_ns));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let app = Router::new().route("/v1/ingest", post(ingest));
    axum::serve(listener, app).await?;
    Ok(())
}
