// soak — proves: hours at a steady rate without degradation (latency, errors) or growth the
// deployment cannot bear. Read: p99 of the first and last hour should match; watch the services'
// RSS and consumer lag on /metrics while it runs (loadtest/soak_memory.py does so locally).
//   k6 run -e RATE=100 -e BATCH=100 -e DURATION=4h … soak.js
import { ingestScenario, num } from './lib/tally.js';

// Defaults shared with `make loadtest` (tally-loadgen): scenarios.json.
const S = JSON.parse(open('./scenarios.json')).soak;
const scenario = ingestScenario('soak', S, {
  executor: 'constant-arrival-rate', rate: num('RATE', S.rate), timeUnit: '1s', duration: __ENV.DURATION || S.duration,
});

export const options = scenario.options;
export const setup = scenario.setup;
export default scenario.iteration;
export const handleSummary = scenario.handleSummary;
