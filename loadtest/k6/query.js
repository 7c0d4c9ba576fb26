// The query benchmark's load (loadtest/bench_query.py drives it): GET BASE+TARGET at RATE
// requests/s for DURATION (open model: arrivals do not wait for answers), each with the API key
// of a random org from KEYS_FILE. Writes k6's end-of-test summary as JSON to SUMMARY_FILE.
import http from 'k6/http';
import { check } from 'k6';

const keys = JSON.parse(open(__ENV.KEYS_FILE));

export const options = {
  scenarios: {
    load: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 200),
      timeUnit: '1s',
      duration: __ENV.DURATION || '30s',
      preAllocatedVUs: 40,
      maxVUs: 400,
    },
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
  discardResponseBodies: true,
};

export default function () {
  const key = keys[Math.floor(Math.random() * keys.length)];
  const res = http.get(`${__ENV.BASE}${__ENV.TARGET}`, { headers: { 'X-API-Key': key } });
  check(res, { 'status 200': (r) => r.status === 200 });
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY_FILE]: JSON.stringify(data) };
}
