// spike — proves: a burst of spike_factor × RATE for a minute (RATE → 10 × RATE → RATE) is
// absorbed: Kafka buffers, the ingest keeps answering 202 within the thresholds, nothing is
// refused. Read: compare the spike's p99 with steady's; consumer lag (tally_consumer_lag on
// /metrics) rises and drains after.
//   k6 run -e RATE=100 -e BATCH=100 … spike.js
import { ingestScenario, num } from './lib/tally.js';

// Defaults shared with `make loadtest` (tally-loadgen): scenarios.json.
const S = JSON.parse(open('./scenarios.json')).spike;
const rate = num('RATE', S.rate);
const stage = (d) => __ENV.STAGE || d;
const scenario = ingestScenario('spike', S, {
  executor: 'ramping-arrival-rate', startRate: rate, timeUnit: '1s', maxVUs: num('MAX_VUS', 2000),
  stages: [
    { target: rate, duration: stage('1m') },
    { target: rate * S.spike_factor, duration: stage('10s') },
    { target: rate * S.spike_factor, duration: stage('1m') },
    { target: rate, duration: stage('10s') },
    { target: rate, duration: stage('1m') },
  ],
});

export const options = scenario.options;
export const setup = scenario.setup;
export default scenario.iteration;
export const handleSummary = scenario.handleSummary;
