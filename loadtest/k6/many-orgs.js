// many-orgs — proves: thousands of orgs at once, each under its plan's limit, are served fairly:
// orgs above their limit get 429 with Retry-After (counted in tally_rate_limited, not as
// failures), the rest 202 with every event accounted for. Read: tally_rate_limited > 0 shows the
// limits engaged; http_req_failed (429 excluded) must stay 0.
//   k6 run -e ORGS=2000 -e PER_MINUTE=600 -e RATE=500 … many-orgs.js
import { ingestScenario, num } from './lib/tally.js';

// Defaults shared with `make loadtest` (tally-loadgen): scenarios.json.
const S = JSON.parse(open('./scenarios.json'))['many-orgs'];
// Small limits so that a random walk over the orgs hits some of them: 429s are part of the test.
const scenario = ingestScenario('many-orgs', S, {
  executor: 'constant-arrival-rate', rate: num('RATE', S.rate), timeUnit: '1s', duration: __ENV.DURATION || S.duration,
  maxVUs: num('MAX_VUS', 1000),
}, { limits: { plan: 'FREE', perMinute: num('PER_MINUTE', S.per_minute), burst: num('BURST', S.burst) }, allow429: true });

export const options = scenario.options;
export const setup = scenario.setup;
export default scenario.iteration;
export const handleSummary = scenario.handleSummary;
