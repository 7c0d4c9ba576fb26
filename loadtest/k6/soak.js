// soak — proves: hours at a steady rate without degradation (latency, errors) or growth the
// deployment cannot bear. Read: p99 of the first and last hour should match; watch the services'
// RSS and consumer lag on /metrics while it runs (loadtest/soak_memory.py does so locally).
//   k6 run -e RATE=100 -e BATCH=100 -e DURATION=4h … soak.js
import { createOrgs, ingest, pick, sdkBatch, summary, num } from './lib/tally.js';

// Defaults shared with `make loadtest` (tally-loadgen): scenarios.json.
const S = JSON.parse(open('./scenarios.json'))['soak'];

export const options = {
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate', rate: num('RATE', S.rate), timeUnit: '1s', duration: __ENV.DURATION || S.duration,
      preAllocatedVUs: num('VUS', 50), maxVUs: num('MAX_VUS', 500), tags: { scenario: 'soak' },
    },
  },
  thresholds: {
    checks: ['rate>0.999'],
    http_req_failed: ['rate<0.001'],
    'http_req_duration{scenario:soak}': [`p(95)<${S.p95_ms}`, `p(99)<${S.p99_ms}`],
    dropped_iterations: ['count==0'],
  },
};

export function setup() {
  return { orgs: createOrgs(num('ORGS', S.orgs)) };
}

export default function (data) {
  ingest(pick(data.orgs), sdkBatch(num('BATCH', S.batch)), { name: 'POST /v1/ingest' });
}

export function handleSummary(data) {
  return summary('soak', data);
}
