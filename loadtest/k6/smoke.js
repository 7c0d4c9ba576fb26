// smoke — proves: the deployment answers, an org's key works, a few SDK batches are accepted whole
// (accepted + rejected = sent), and the query API sees the org. Run it first against any target.
// Read: every check must pass and http_req_failed must be 0; anything else means the deployment
// is not ready for the other scenarios.
//   k6 run -e TALLY_INGEST_URL=… -e TALLY_QUERY_URL=… -e TALLY_ADMIN_TOKEN=… smoke.js
import http from 'k6/http';
import { check } from 'k6';
import { createOrgs, ingest, sdkBatch, summary, QUERY, num } from './lib/tally.js';

// Defaults shared with `make loadtest` (tally-loadgen): scenarios.json.
const S = JSON.parse(open('./scenarios.json'))['smoke'];

export const options = {
  scenarios: { smoke: { executor: 'per-vu-iterations', vus: 1, iterations: num('ITERATIONS', 5), tags: { scenario: 'smoke' } } },
  thresholds: { checks: ['rate==1'], http_req_failed: ['rate==0'], 'http_req_duration{scenario:smoke}': [`p(95)<${S.p95_ms}`] },
};

export function setup() {
  return { orgs: createOrgs(1) };
}

export default function (data) {
  const org = data.orgs[0];
  ingest(org, sdkBatch(num('BATCH', S.batch)), { name: 'POST /v1/ingest' });
  const res = http.get(`${QUERY}/api/telemetry/status`, { headers: { 'X-API-Key': org.key }, tags: { name: 'GET status' } });
  check(res, { 'status answers 200': (r) => r.status === 200, 'status says connected': (r) => r.status === 200 && r.json('connected') !== undefined });
}

export function handleSummary(data) {
  return summary('smoke', data);
}
