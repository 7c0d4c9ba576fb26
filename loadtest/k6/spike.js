// spike — proves: a 10× burst for a minute (RATE → 10 × RATE → RATE) is absorbed: Kafka buffers,
// the ingest keeps answering 202 within the thresholds, nothing is refused. Read: compare the
// spike's p99 with steady's; consumer lag (tally_consumer_lag on /metrics) rises and drains after.
//   k6 run -e RATE=100 -e BATCH=100 … spike.js
import { createOrgs, ingest, pick, sdkBatch, summary, num } from './lib/tally.js';

// Defaults shared with `make loadtest` (tally-loadgen): scenarios.json.
const S = JSON.parse(open('./scenarios.json'))['spike'];

const rate = num('RATE', S.rate);
const stage = (d) => __ENV.STAGE || d;

export const options = {
  scenarios: {
    spike: {
      executor: 'ramping-arrival-rate', startRate: rate, timeUnit: '1s',
      preAllocatedVUs: num('VUS', 100), maxVUs: num('MAX_VUS', 2000), tags: { scenario: 'spike' },
      stages: [
        { target: rate, duration: stage('1m') },
        { target: rate * S.spike_factor, duration: stage('10s') },
        { target: rate * S.spike_factor, duration: stage('1m') },
        { target: rate, duration: stage('10s') },
        { target: rate, duration: stage('1m') },
      ],
    },
  },
  thresholds: {
    checks: ['rate>0.999'],
    http_req_failed: ['rate<0.001'],
    'http_req_duration{scenario:spike}': [`p(95)<${S.p95_ms}`, `p(99)<${S.p99_ms}`],
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
  return summary('spike', data);
}
