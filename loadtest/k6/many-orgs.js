// many-orgs — proves: thousands of orgs at once, each under its plan's limit, are served fairly:
// orgs above their limit get 429 with Retry-After (counted in tally_rate_limited, not as
// failures), the rest 202 with every event accounted for. Read: tally_rate_limited > 0 shows the
// limits engaged; http_req_failed (429 excluded) must stay 0.
//   k6 run -e ORGS=2000 -e PER_MINUTE=600 -e RATE=500 … many-orgs.js
import { createOrgs, ingest, pick, sdkBatch, summary, num } from './lib/tally.js';

// Defaults shared with `make loadtest` (tally-loadgen): scenarios.json.
const S = JSON.parse(open('./scenarios.json'))['many-orgs'];

export const options = {
  scenarios: {
    many_orgs: {
      executor: 'constant-arrival-rate', rate: num('RATE', S.rate), timeUnit: '1s', duration: __ENV.DURATION || S.duration,
      preAllocatedVUs: num('VUS', 100), maxVUs: num('MAX_VUS', 1000), tags: { scenario: 'many-orgs' },
    },
  },
  thresholds: {
    checks: ['rate>0.999'],
    http_req_failed: ['rate<0.001'], // 429s are expected statuses here, not failures
    'http_req_duration{scenario:many-orgs}': [`p(95)<${S.p95_ms}`, `p(99)<${S.p99_ms}`],
    dropped_iterations: ['count==0'],
  },
};

export function setup() {
  // Small limits so that a random walk over the orgs hits some of them: 429s are part of the test.
  return { orgs: createOrgs(num('ORGS', S.orgs), { plan: 'FREE', perMinute: num('PER_MINUTE', S.per_minute), burst: num('BURST', S.burst) }) };
}

export default function (data) {
  ingest(pick(data.orgs), sdkBatch(num('BATCH', S.batch)), { name: 'POST /v1/ingest' }, true);
}

export function handleSummary(data) {
  return summary('many-orgs', data);
}
