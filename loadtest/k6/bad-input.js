// bad-input — proves: every kind of bad request gets its documented 4xx (README "Ingest
// contract") and never a 5xx, and invalid events reject only themselves (202, the valid ones
// accepted). Cases: malformed JSON (400), no key and a wrong key (401), an unsupported encoding
// (415), more than 1000 events (413), a body over the size limit (413), a gzip bomb (413 after at
// most the decompressed limit is inflated), a batch mixing valid and invalid events (202, each
// invalid one in `rejected`). Read: every check passes; `never 5xx` failing is a defect.
//   k6 run … bad-input.js
import http from 'k6/http';
import { check } from 'k6';
import { createOrgs, ingest, sdkBatch, summary, INGEST, num } from './lib/tally.js';

export const options = {
  scenarios: { bad_input: { executor: 'per-vu-iterations', vus: num('VUS', 2), iterations: num('ITERATIONS', 10), tags: { scenario: 'bad-input' } } },
  thresholds: { checks: ['rate==1'], 'http_req_duration{scenario:bad-input}': ['p(99)<2000'] },
};

export function setup() {
  return { orgs: createOrgs(1) };
}

function post(body, headers, name, expected) {
  const res = http.post(`${INGEST}/v1/ingest`, body, {
    headers: Object.assign({ 'Content-Type': 'application/json' }, headers),
    tags: { name },
    responseCallback: http.expectedStatuses(expected),
  });
  check(res, {
    [`${name}: ${expected}`]: (r) => r.status === expected,
    'never 5xx': (r) => r.status < 500,
    'error body says what to do': (r) => r.status < 400 || (r.json('error.code') !== undefined && r.json('error.hint') !== undefined),
  });
  return res;
}

export default function (data) {
  const key = { 'X-API-Key': data.orgs[0].key };
  post('{"events": [', key, 'malformed JSON', 400);
  post(JSON.stringify({ events: sdkBatch(1) }), {}, 'no API key', 401);
  post(JSON.stringify({ events: sdkBatch(1) }), { 'X-API-Key': 'tally_not_a_real_key_0000000000000000' }, 'wrong API key', 401);
  post(JSON.stringify({ events: sdkBatch(1) }), Object.assign({ 'Content-Encoding': 'br' }, key), 'unsupported encoding', 415);
  post(JSON.stringify({ events: sdkBatch(1001) }), key, 'more than 1000 events', 413);
  post(`{"events": [], "pad": "${' '.repeat(9 * 1024 * 1024)}"}`, key, 'body over the limit', 413);
  // A gzip bomb: 64 MiB of spaces that compress to ~64 KiB; the ingest stops inflating at its limit.
  const bomb = http.post(`${INGEST}/v1/ingest`, `{"events": [], "pad": "${' '.repeat(64 * 1024 * 1024)}"}`, {
    headers: Object.assign({ 'Content-Type': 'application/json' }, key),
    compression: 'gzip',
    tags: { name: 'gzip bomb' },
    responseCallback: http.expectedStatuses(413),
  });
  check(bomb, { 'gzip bomb: 413': (r) => r.status === 413, 'never 5xx': (r) => r.status < 500 });
  // Valid and invalid events in one batch: only the invalid ones are rejected.
  const events = sdkBatch(4);
  events[1].tokens.promptTokens = -5;
  events[3].timestamp = 'yesterday';
  const res = ingest(data.orgs[0], events, { name: 'mixed batch' });
  check(res, {
    'mixed batch: the 2 valid events accepted': (r) => r.status === 202 && r.json('accepted') === 2,
    'mixed batch: each invalid event rejected by index': (r) => r.status === 202
      && JSON.stringify((r.json('rejected') || []).map((x) => x.index)) === '[1,3]',
  });
}

export function handleSummary(data) {
  return summary('bad-input', data);
}
