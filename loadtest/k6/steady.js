// steady — proves: the deployment takes RATE requests/s of BATCH-event SDK batches from ORGS orgs
// (open model: constant-arrival-rate, arrivals do not wait for answers) for DURATION with p95/p99
// inside the thresholds and no dropped iterations. Read: events/s = RATE × BATCH when it passes;
// `dropped_iterations` > 0 means k6 itself ran out of VUs (raise MAX_VUS) or the target queued.
//   k6 run -e RATE=200 -e BATCH=100 -e ORGS=50 -e DURATION=5m … steady.js
import { createOrgs, ingest, pick, sdkBatch, summary, num } from './lib/tally.js';

// Defaults shared with `make loadtest` (tally-loadgen): scenarios.json.
const S = JSON.parse(open('./scenarios.json'))['steady'];

export const options = {
  scenarios: {
    steady: {
      executor: 'constant-arrival-rate', rate: num('RATE', S.rate), timeUnit: '1s', duration: __ENV.DURATION || S.duration,
      preAllocatedVUs: num('VUS', 50), maxVUs: num('MAX_VUS', 500), tags: { scenario: 'steady' },
    },
  },
  thresholds: {
    checks: ['rate>0.999'],
    http_req_failed: ['rate<0.001'],
    'http_req_duration{scenario:steady}': [`p(95)<${S.p95_ms}`, `p(99)<${S.p99_ms}`],
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
  return summary('steady', data);
}
