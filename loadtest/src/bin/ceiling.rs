//! The ceiling for ingest benchmarks: an axum server whose handler only reads the whole body and
//! answers 202, on the same runtime settings as the ingest. Whatever the ingest does on top of this
//! is what its benchmark figures pay for.
//!
//! Usage: tally-ceiling [ADDR]   (default 127.0.0.1:18090)

use axum::body::{to_bytes, Body};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;

async fn ingest(body: Body) -> StatusCode {
    match to_bytes(body, 16 << 20).await {
        Ok(bytes) if !bytes.is_empty() => StatusCode::ACCEPTED,
        _ => StatusCode::BAD_REQUEST,
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18090".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let app = Router::new().route("/v1/ingest", post(ingest));
    axum::serve(listener, app).await?;
    Ok(())
}
