-- Raw usage events, one row per accepted event. Partitioned by month of the event's time,
-- ordered by org first so every org-scoped query reads only its own range.
-- Cost is fixed point: cost_nanos is nano-dollars (1e-9 USD). timestamp_ms holds the
-- millisecond part of the event time (DateTime has second resolution on every version).
-- kafka_partition/kafka_offset/kafka_index locate the row in tally.events.v1: the consumer's
-- exactly-once recovery reads them back.
CREATE TABLE IF NOT EXISTS {db}.events
(
    org_id String,
    event_id UUID,
    timestamp DateTime('UTC'),
    timestamp_ms UInt16,
    received_at DateTime('UTC'),
    provider String,
    model String,
    prompt_tokens UInt32,
    completion_tokens UInt32,
    total_tokens UInt32,
    cost_nanos Int64,
    cost_source Enum8('client' = 1, 'computed' = 2, 'unknown' = 3),
    latency_ms UInt32,
    status Enum8('success' = 1, 'error' = 2),
    http_status UInt16,
    error String,
    execution_id String,
    agent_id String,
    user_id String,
    service String,
    action String,
    request_id String,
    input_bytes UInt64,
    output_bytes UInt64,
    metadata_keys Array(String),
    metadata_values Array(String),
    kafka_partition UInt16,
    kafka_offset UInt64,
    kafka_index UInt32
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(timestamp)
ORDER BY (org_id, timestamp, event_id)
SETTINGS index_granularity = 8192;
