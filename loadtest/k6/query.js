// query — proves: the query API answers its org-scoped endpoints at RATE requests/s (spread over
// status, cost summary, events list, budget, overview, timeseries, perf) within per-endpoint
// p95/p99 thresholds. setup() makes ORGS orgs and sends each some events, so every read has rows.
// Read: per-endpoint latency is in the summary under http_req_duration{endpoint:…}; the rollups
// answer whole hours, raw rows only the range's ragged edges.
//   k6 run -e RATE=200 -e ORGS=50 -e DURATION=2m … query.js
import http from 'k6/http';
import { check } from 'k6';
import { createOrgs, ingest, pick, sdkBatch, summary, QUERY, num } from './lib/tally.js';

const ENDPOINTS = [
  ['status', () => '/api/telemetry/status'],
  ['summary', () => '/api/costs/summary'],
  ['events', () => '/api/costs?limit=50'],
  ['budget', () => '/api/costs/budget'],
  ['overview', () => '/api/analytics/overview'],
  ['timeseries', () => `/api/analytics/timeseries?bucket=${Math.random() < 0.5 ? 'hour' : 'day'}`],
  ['perf', () => '/api/analytics/perf'],
];

const thresholds = { checks: ['rate>0.999'], http_req_failed: ['rate<0.001'], dropped_iterations: ['count==0'] };
for (const [name] of ENDPOINTS) thresholds[`http_req_duration{endpoint:${name}}`] = ['p(95)<100', 'p(99)<300'];

export const options = {
  scenarios: {
    query: {
      executor: 'constant-arrival-rate', rate: num('RATE', 100), timeUnit: '1s', duration: __ENV.DURATION || '1m',
      preAllocatedVUs: num('VUS', 50), maxVUs: num('MAX_VUS', 500), tags: { scenario: 'query' },
    },
  },
  thresholds,
};

export function setup() {
  const orgs = createOrgs(num('ORGS', 20));
  for (const org of orgs) ingest(org, sdkBatch(num('BATCH', 100)), { name: 'setup: events' });
  return { orgs };
}

export default function (data) {
  const org = pick(data.orgs);
  const [name, path] = pick(ENDPOINTS);
  const res = http.get(`${QUERY}${path()}`, { headers: { 'X-API-Key': org.key }, tags: { endpoint: name, name } });
  check(res, { [`${name} answers 200`]: (r) => r.status === 200 });
}

export function handleSummary(data) {
  return summary('query', data);
}
