//! The consumer: Kafka `tally.events.v1` → ClickHouse `tally.events`, exactly once. Where each job
//! lives: `worker` (the loop), `batch` (the records of a batch and the stage shape), `reconcile`
//! and `dedup` (the stages that keep a re-read or a retried event from being stored twice),
//! `store` (every query on `events`), `views` (completing rollups an interrupted insert missed),
//! `kafka` (consumer, commits, lag, dead letters), `retry`, `dlq` (the operator's `dlq` command).

pub mod batch;
pub mod config;
pub mod control;
pub mod dedup;
pub mod dlq;
pub mod error;
#[cfg(feature = "failpoints")]
pub mod failpoints;
pub mod kafka;
pub mod metrics;
pub mod reconcile;
pub mod restart;
pub mod retry;
pub mod store;
pub mod views;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use prometheus::Registry;
use rdkafka::consumer::Consumer;
use tally_common::ch;
use tally_common::server::{self, OpsState, Readiness};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ConsumerConfig;
use crate::error::ConsumerError;
use crate::kafka::DeadLetters;
use crate::metrics::ConsumerMetrics;
use crate::store::EventStore;
use crate::worker::Worker;

struct ConsumerReadiness {
    clickhouse: clickhouse::Client,
}

impl Readiness for ConsumerReadiness {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if ch::ping(&self.clickhouse).await {
                Ok(())
            } else {
                Err("clickhouse unreachable".into())
            }
        })
    }
}

/// Runs the consumer until `shutdown`, serving `/healthz`, `/readyz`, `/metrics` on `listener`.
/// On shutdown the batch in hand is inserted and committed before returning.
pub async fn run(
    config: ConsumerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let clickhouse = config.common.clickhouse.clone();
    if config.migrate {
        tally_common::migrate::migrate(&clickhouse).await?;
    }
    let registry = Registry::new();
    let metrics = ConsumerMetrics::register(&registry)?;
    let ops = OpsState {
        registry,
        readiness: Arc::new(ConsumerReadiness { clickhouse: clickhouse.client() }),
        shutdown: shutdown.clone(),
    };
    let http_shutdown = CancellationToken::new();
    let http = tokio::spawn(server::serve(listener, server::ops_routes(ops), http_shutdown.clone()));
    let control_shutdown = CancellationToken::new();
    let control = control::spawn_publisher(
        &config,
        metrics.control_snapshots_published.clone(),
        control_shutdown.clone(),
    )?;
    tracing::info!(topic = %config.events_topic, group = %config.group_id, "consumer started");
    let result = loop {
        match consume(&config, &clickhouse, &metrics, shutdown.clone()).await {
            // The batches in flight are dropped uncommitted: the next client reads them again and
            // the reconciler and the dedup window keep them exactly once, as after a rebalance.
            Err(ConsumerError::KafkaFatal { code, reason }) if !shutdown.is_cancelled() => {
                tracing::error!(?code, reason = %reason, "kafka client failed fatally; replacing it");
                metrics.kafka_clients_replaced.inc();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => break other,
        }
    };
    http_shutdown.cancel();
    control_shutdown.cancel();
    if let Some(control) = control {
        let _ = control.await;
    }
    let _ = http.await;
    result
}

/// One Kafka client's life: subscribe, run the loop until shutdown or a fatal client error.
async fn consume(
    config: &ConsumerConfig,
    clickhouse: &ch::ChConfig,
    metrics: &ConsumerMetrics,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let consumer = kafka::consumer(config)?;
    consumer.subscribe(&[&config.events_topic])?;
    let consumer = Arc::new(consumer);
    let background = CancellationToken::new();
    let sampler = kafka::spawn_lag_sampler(
        Arc::clone(&consumer),
        metrics.lag.clone(),
        Duration::from_secs(5),
        background.clone(),
    );
    // Clients that forgot every broker (see `tally_common::kafka`) get them back.
    let guard = tally_common::kafka::spawn_guard(
        "consumer",
        Arc::clone(&consumer),
        kafka::KafkaConsumer::client,
        &config.brokers,
        &config.events_topic,
        background.clone(),
    );
    let dead_letters = DeadLetters::new(config, metrics.dead_letters.clone())?;
    dead_letters.spawn_guard(config, background.clone());
    let worker = Worker {
        dead_letters,
        store: EventStore::new(clickhouse),
        consumer,
        metrics: metrics.clone(),
        config: config.clone(),
    };
    let result = worker.run(shutdown).await;
    // The sampler and the guard hold the client too (and so does every polled record until it
    // is freed, see `batch::KafkaPayload`): once they ended, the client is dropped, which closes
    // it and waits for the asynchronous commits still outstanding (the last batch's).
    background.cancel();
    let _ = tokio::join!(sampler, guard);
    result
}
