-- The price table of seed 000 (per 1K tokens, December 2024), as nano-dollars per million
-- tokens, effective from 2024-12-01. Version 1: a re-run inserts the same keys, which
-- ReplacingMergeTree collapses, so this seed is idempotent.
INSERT INTO {db}.model_prices (provider, model, effective_from, input_nanos_per_mtok, output_nanos_per_mtok, version) VALUES
    ('openai', 'gpt-4', '2024-12-01 00:00:00', 30000000000, 60000000000, 1),
    ('openai', 'gpt-4-turbo', '2024-12-01 00:00:00', 10000000000, 30000000000, 1),
    ('openai', 'gpt-4o', '2024-12-01 00:00:00', 2500000000, 10000000000, 1),
    ('openai', 'gpt-4o-mini', '2024-12-01 00:00:00', 150000000, 600000000, 1),
    ('openai', 'gpt-3.5-turbo', '2024-12-01 00:00:00', 500000000, 1500000000, 1),
    ('openai', 'o1-preview', '2024-12-01 00:00:00', 15000000000, 60000000000, 1),
    ('openai', 'o1-mini', '2024-12-01 00:00:00', 3000000000, 12000000000, 1),
    ('anthropic', 'claude-3-5-sonnet-20241022', '2024-12-01 00:00:00', 3000000000, 15000000000, 1),
    ('anthropic', 'claude-3-opus-20240229', '2024-12-01 00:00:00', 15000000000, 75000000000, 1),
    ('anthropic', 'claude-3-haiku-20240307', '2024-12-01 00:00:00', 250000000, 1250000000, 1),
    ('ollama', 'llama2', '2024-12-01 00:00:00', 0, 0, 1),
    ('ollama', 'llama3', '2024-12-01 00:00:00', 0, 0, 1),
    ('ollama', 'mistral', '2024-12-01 00:00:00', 0, 0, 1);
