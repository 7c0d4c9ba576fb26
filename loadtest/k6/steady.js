// steady — proves: the deployment takes RATE requests/s of BATCH-event SDK batches from ORGS orgs
// (open model: constant-arrival-rate, arrivals do not wait for answers) for DURATION with p95/p99
// inside the thresholds and no dropped iterations. Read: events/s = RATE × BATCH when it passes;
// `dropped_iterations` > 0 means k6 itself ran out of VUs (raise MAX_VUS) or the target queued.
//   k6 run -e RATE=200 -e BATCH=100 -e ORGS=50 -e DURATION=5m … steady.js
import { ingestScenario, num } from './lib/tally.js';

// Defaults shared with `make loadtest` (tally-loadgen): scenarios.json.
const S = JSON.parse(open('./scenarios.json')).steady;
const scenario = ingestScenario('steady', S, {
  executor: 'constant-arrival-rate', rate: num('RATE', S.rate), timeUnit: '1s', duration: __ENV.DURATION || S.duration,
});

export const options = scenario.options;
export const setup = scenario.setup;
export default scenario.iteration;
export const handleSummary = scenario.handleSummary;
