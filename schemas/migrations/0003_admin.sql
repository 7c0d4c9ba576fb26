-- Small admin tables. Each row is a version of an entity: ReplacingMergeTree keeps the highest
-- `version` (epoch ms of the change) per sorting key; readers take the latest with FINAL or
-- argMax, so an update is an insert and concurrent writers never need a lock.
CREATE TABLE IF NOT EXISTS {db}.orgs
(
    org_id String,
    name String,
    plan Enum8('FREE' = 1, 'STARTUP' = 2, 'ENTERPRISE' = 3),
    -- per-org overrides of the plan's rate limit, events per minute and burst; 0 = plan default
    rate_limit_per_min UInt32,
    rate_limit_burst UInt32,
    created_at DateTime('UTC'),
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY org_id;

-- API keys are stored as the hex SHA-256 of the key; the key itself is shown once at creation.
CREATE TABLE IF NOT EXISTS {db}.api_keys
(
    key_hash String,
    key_prefix String,
    org_id String,
    name String,
    created_at DateTime('UTC'),
    revoked UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY key_hash;

CREATE TABLE IF NOT EXISTS {db}.budgets
(
    org_id String,
    monthly_limit_nanos Int64,
    alert_thresholds Array(UInt8),
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY org_id;

-- Model prices in nano-dollars per million tokens, each effective from an instant.
CREATE TABLE IF NOT EXISTS {db}.model_prices
(
    provider String,
    model String,
    effective_from DateTime('UTC'),
    input_nanos_per_mtok Int64,
    output_nanos_per_mtok Int64,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (provider, model, effective_from);
