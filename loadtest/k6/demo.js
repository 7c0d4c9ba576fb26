// Demo traffic for `make up`: a few seed-000 SDK batches (10 events each) from a handful of
// users and models, checked for 202. Run: TALLY_INGEST_URL=... TALLY_API_KEY=... k6 run demo.js
import http from 'k6/http';
import { check } from 'k6';

export const options = {
  vus: 2,
  iterations: 20,
  thresholds: { checks: ['rate==1'] },
};

const models = [
  ['openai', 'gpt-4o'], ['openai', 'gpt-4o-mini'], ['anthropic', 'claude-3-5-sonnet-20241022'], ['ollama', 'llama3'],
];

export default function () {
  const events = [];
  for (let i = 0; i < 10; i++) {
    const [provider, model] = models[(__ITER + i) % models.length];
    const prompt = 200 + Math.floor(Math.random() * 2000);
    const completion = 50 + Math.floor(Math.random() * 800);
    const event = {
      timestamp: new Date(Date.now() - Math.floor(Math.random() * 3600 * 1000)).toISOString(),
      provider, model,
      tokens: { promptTokens: prompt, completionTokens: completion, totalTokens: prompt + completion },
      latency: 200 + Math.floor(Math.random() * 3000),
      status: Math.random() < 0.05 ? 'error' : 'success',
      error: null,
      userId: `user-${(__VU * 7 + i) % 5}`,
      executionId: `exec-${__ITER}`,
    };
    // Half the events carry the client's cost; the rest are priced by Tally's registry.
    if (i % 2 === 0) event.cost = +(prompt * 0.0000025 + completion * 0.00001).toFixed(6);
    events.push(event);
  }
  const res = http.post(`${__ENV.TALLY_INGEST_URL}/v1/ingest`, JSON.stringify({ events }), {
    headers: { 'Content-Type': 'application/json', 'X-API-Key': __ENV.TALLY_API_KEY },
  });
  check(res, {
    'status is 202': (r) => r.status === 202,
    'all accepted': (r) => r.status === 202 && r.json('accepted') === 10,
  });
}
