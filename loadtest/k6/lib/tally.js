// Shared pieces of Tally's k6 scenarios: configuration from __ENV, orgs and keys made in setup()
// through the admin API, seed-000 SDK batches, the ingest call with its checks, and the summary.
//
// __ENV: TALLY_INGEST_URL (default http://127.0.0.1:8080), TALLY_QUERY_URL (default
// http://127.0.0.1:8081), TALLY_ADMIN_TOKEN (required: setup() creates the orgs), ORGS, BATCH,
// RATE, DURATION (each scenario says its defaults), SUMMARY_DIR (where handleSummary writes JSON,
// default the working directory).
import http from 'k6/http';
import { check, fail, sleep } from 'k6';
import { Counter } from 'k6/metrics';

export const INGEST = __ENV.TALLY_INGEST_URL || 'http://127.0.0.1:8080';
export const QUERY = __ENV.TALLY_QUERY_URL || 'http://127.0.0.1:8081';

export function num(name, fallback) {
  const value = __ENV[name];
  if (value === undefined || value === '') return fallback;
  const parsed = Number(value);
  if (!Number.isFinite(parsed)) fail(`${name}=${value} is not a number`);
  return parsed;
}

/** Events the ingest accepted, and rejected (answered 202 with `rejected`), and 429s: counted apart. */
export const acceptedEvents = new Counter('tally_events_accepted');
export const rejectedEvents = new Counter('tally_events_rejected');
export const rateLimited = new Counter('tally_rate_limited');

/**
 * `count` orgs with a key each, made through the admin API (call it from setup()). `limits`:
 * { plan, perMinute, burst } (defaults: ENTERPRISE with limits above any test rate).
 */
export function createOrgs(count, limits = {}) {
  const token = __ENV.TALLY_ADMIN_TOKEN;
  if (!token) fail('TALLY_ADMIN_TOKEN is required: setup() creates the orgs and keys through /admin/orgs');
  const orgs = [];
  for (let i = 0; i < count; i++) {
    const body = {
      name: `k6-${Date.now()}-${i}`,
      plan: limits.plan || 'ENTERPRISE',
      rateLimitPerMin: limits.perMinute === undefined ? 10000000 : limits.perMinute,
      rateLimitBurst: limits.burst === undefined ? 1000000 : limits.burst,
    };
    const res = http.post(`${QUERY}/admin/orgs`, JSON.stringify(body), {
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
      tags: { name: 'setup:create org' },
    });
    if (res.status !== 201) fail(`POST /admin/orgs answered ${res.status}: ${res.body}`);
    orgs.push({ id: res.json('orgId'), key: res.json('apiKey') });
  }
  // Ingest replicas learn new keys at their next refresh (TALLY_KEY_REFRESH_MS, 5 s by default).
  waitForKey(orgs[orgs.length - 1].key);
  return orgs;
}

function waitForKey(key) {
  for (let i = 0; i < 60; i++) {
    const res = http.post(`${INGEST}/v1/ingest`, '{"events":[]}', {
      headers: { 'Content-Type': 'application/json', 'X-API-Key': key },
      tags: { name: 'setup:wait for key' },
      responseCallback: http.expectedStatuses(202, 401),
    });
    if (res.status !== 401) return;
    sleep(0.5);
  }
  fail('the ingest did not learn the new keys within 30 s');
}

const MODELS = [
  ['openai', 'gpt-4o'], ['openai', 'gpt-4o-mini'], ['anthropic', 'claude-3-5-sonnet-20241022'], ['ollama', 'llama3'],
];

/** One SDK batch in the published SDK's format (seed 000): `size` events, half with a client cost. */
export function sdkBatch(size) {
  const events = [];
  for (let i = 0; i < size; i++) {
    const [provider, model] = MODELS[Math.floor(Math.random() * MODELS.length)];
    const prompt = 100 + Math.floor(Math.random() * 4000);
    const completion = 20 + Math.floor(Math.random() * 900);
    const event = {
      timestamp: new Date(Date.now() - Math.floor(Math.random() * 3600 * 1000)).toISOString(),
      provider, model,
      tokens: { promptTokens: prompt, completionTokens: completion, totalTokens: prompt + completion },
      latency: 150 + Math.floor(Math.random() * 5000),
      status: Math.random() < 0.02 ? 'error' : 'success',
      error: null,
      userId: `user-${Math.floor(Math.random() * 1000)}`,
      executionId: `exec-${Math.floor(Math.random() * 100000)}`,
    };
    if (i % 2 === 0) event.cost = +(prompt * 0.0000025 + completion * 0.00001).toFixed(6);
    events.push(event);
  }
  return events;
}

/**
 * POSTs a batch for `org` and checks the answer: 202 with `accepted` + `rejected` adding up to the
 * batch, or (when `allow429`) a 429 counted apart. Returns the response.
 */
export function ingest(org, events, tags = {}, allow429 = false) {
  const res = http.post(`${INGEST}/v1/ingest`, JSON.stringify({ events }), {
    headers: { 'Content-Type': 'application/json', 'X-API-Key': org.key },
    tags,
    responseCallback: allow429 ? http.expectedStatuses(202, 429) : http.expectedStatuses(202),
  });
  if (res.status === 429 && allow429) {
    rateLimited.add(1);
    check(res, { '429 says when to retry': (r) => r.headers['Retry-After'] !== undefined || r.headers['retry-after'] !== undefined });
    return res;
  }
  const ok = check(res, {
    'ingest answered 202': (r) => r.status === 202,
    'accepted + rejected = events sent': (r) => r.status === 202
      && r.json('accepted') + (r.json('rejected') || []).length === events.length,
  });
  if (ok) {
    acceptedEvents.add(res.json('accepted'));
    rejectedEvents.add((res.json('rejected') || []).length);
  }
  return res;
}

export function pick(list) {
  return list[Math.floor(Math.random() * list.length)];
}

/** handleSummary's result: the k6 summary as JSON in SUMMARY_DIR/<name>.json, and a short text. */
export function summary(name, data) {
  const dir = __ENV.SUMMARY_DIR || '.';
  const metric = (m, field) => (data.metrics[m] && data.metrics[m].values ? data.metrics[m].values[field] : undefined);
  const lines = [
    `${name}: ${metric('http_reqs', 'count') || 0} requests, failed rate ${metric('http_req_failed', 'rate') || 0}`,
    `  p95 ${metric('http_req_duration', 'p(95)')} ms, p99 ${metric('http_req_duration', 'p(99)')} ms`,
    `  events accepted ${metric('tally_events_accepted', 'count') || 0}, rejected ${metric('tally_events_rejected', 'count') || 0}, 429s ${metric('tally_rate_limited', 'count') || 0}, dropped iterations ${metric('dropped_iterations', 'count') || 0}`,
  ];
  return { [`${dir}/${name}.json`]: JSON.stringify(data, null, 2), stdout: lines.join('\n') + '\n' };
}

/**
 * The parts of an ingest scenario (steady, spike, soak, many-orgs): `executor` is the k6 scenario
 * (executor and its rate or stages), `shape` its entry of scenarios.json. Returns the options
 * (thresholds: every check, < 0.1 % failed requests, the shape's p95/p99, no dropped iterations),
 * setup (the orgs, with `limits`), the iteration and handleSummary for the script to export.
 */
export function ingestScenario(name, shape, executor, { limits = {}, allow429 = false } = {}) {
  const tag = `http_req_duration{scenario:${name}}`;
  return {
    options: {
      scenarios: { [name.replace('-', '_')]: Object.assign({ preAllocatedVUs: num('VUS', 50), maxVUs: num('MAX_VUS', 500), tags: { scenario: name } }, executor) },
      thresholds: {
        checks: ['rate>0.999'],
        http_req_failed: ['rate<0.001'],
        [tag]: [`p(95)<${shape.p95_ms}`, `p(99)<${shape.p99_ms}`],
        dropped_iterations: ['count==0'],
      },
    },
    setup: () => ({ orgs: createOrgs(num('ORGS', shape.orgs), limits) }),
    iteration: (data) => ingest(pick(data.orgs), sdkBatch(num('BATCH', shape.batch)), { name: 'POST /v1/ingest' }, allow429),
    handleSummary: (data) => summary(name, data),
  };
}
