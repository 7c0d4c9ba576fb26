-- Hourly and daily rollups per org/provider/model/service, fed by materialized views on insert
-- into events. Aggregate states merge exactly: counts, token sums and cost sums (Int64
-- nano-dollars) are integers, so a rollup equals the same aggregate over the raw table as long
-- as the raw table never receives a duplicate (the consumer's job). Read with the -Merge
-- combinators, e.g. countMerge(events), sumMerge(cost_nanos_sum).
--
-- index_granularity = 256: a request reads one org's rows (a few hundred per part for a month of
-- hours), and ClickHouse reads and decodes whole granules, so the default 8192 made every request
-- decode tens of thousands of other orgs' quantile states. Databases created before this setting
-- (checksum listed in schemas/src/migrations.rs) keep 8192 and still work; docs/operations.md says
-- how to rebuild their rollups offline.
CREATE TABLE IF NOT EXISTS {db}.rollup_hourly
(
    org_id String,
    hour DateTime('UTC'),
    provider String,
    model String,
    service String,
    events AggregateFunction(count),
    errors AggregateFunction(sum, UInt64),
    prompt_tokens_sum AggregateFunction(sum, UInt64),
    completion_tokens_sum AggregateFunction(sum, UInt64),
    total_tokens_sum AggregateFunction(sum, UInt64),
    cost_nanos_sum AggregateFunction(sum, Int64),
    input_bytes_sum AggregateFunction(sum, UInt64),
    output_bytes_sum AggregateFunction(sum, UInt64),
    latency_quantiles AggregateFunction(quantilesTiming(0.5, 0.95, 0.99), UInt32)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(hour)
ORDER BY (org_id, hour, provider, model, service)
SETTINGS index_granularity = 256;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.rollup_hourly_mv TO {db}.rollup_hourly AS
SELECT
    org_id,
    toStartOfHour(timestamp) AS hour,
    provider,
    model,
    service,
    countState() AS events,
    sumState(toUInt64(status = 'error')) AS errors,
    sumState(toUInt64(prompt_tokens)) AS prompt_tokens_sum,
    sumState(toUInt64(completion_tokens)) AS completion_tokens_sum,
    sumState(toUInt64(total_tokens)) AS total_tokens_sum,
    sumState(cost_nanos) AS cost_nanos_sum,
    sumState(input_bytes) AS input_bytes_sum,
    sumState(output_bytes) AS output_bytes_sum,
    quantilesTimingState(0.5, 0.95, 0.99)(latency_ms) AS latency_quantiles
FROM {db}.events
GROUP BY org_id, hour, provider, model, service;

CREATE TABLE IF NOT EXISTS {db}.rollup_daily
(
    org_id String,
    day Date,
    provider String,
    model String,
    service String,
    events AggregateFunction(count),
    errors AggregateFunction(sum, UInt64),
    prompt_tokens_sum AggregateFunction(sum, UInt64),
    completion_tokens_sum AggregateFunction(sum, UInt64),
    total_tokens_sum AggregateFunction(sum, UInt64),
    cost_nanos_sum AggregateFunction(sum, Int64),
    input_bytes_sum AggregateFunction(sum, UInt64),
    output_bytes_sum AggregateFunction(sum, UInt64),
    latency_quantiles AggregateFunction(quantilesTiming(0.5, 0.95, 0.99), UInt32)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(day)
ORDER BY (org_id, day, provider, model, service)
SETTINGS index_granularity = 256;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.rollup_daily_mv TO {db}.rollup_daily AS
SELECT
    org_id,
    toDate(timestamp) AS day,
    provider,
    model,
    service,
    countState() AS events,
    sumState(toUInt64(status = 'error')) AS errors,
    sumState(toUInt64(prompt_tokens)) AS prompt_tokens_sum,
    sumState(toUInt64(completion_tokens)) AS completion_tokens_sum,
    sumState(toUInt64(total_tokens)) AS total_tokens_sum,
    sumState(cost_nanos) AS cost_nanos_sum,
    sumState(input_bytes) AS input_bytes_sum,
    sumState(output_bytes) AS output_bytes_sum,
    quantilesTimingState(0.5, 0.95, 0.99)(latency_ms) AS latency_quantiles
FROM {db}.events
GROUP BY org_id, day, provider, model, service;
