// Smoke-runs one k6 script under Node with the stand-ins (see register.mjs): checks `options`
// (known executors, threshold expressions k6 accepts), runs setup(), a few iterations of each
// scenario's function, teardown() and handleSummary(), and fails on an exception, a failed check,
// or a request whose status the script did not expect (k6's http_req_failed).
//   node --import ./standin/register.mjs standin/run.mjs SCRIPT [ITERATIONS]
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { registry } from './registry.mjs';

const EXECUTORS = new Set(['shared-iterations', 'per-vu-iterations', 'constant-vus', 'ramping-vus',
  'constant-arrival-rate', 'ramping-arrival-rate', 'externally-controlled']);
const THRESHOLD = /^(rate|count|value|avg|min|max|med|p\(\d+(\.\d+)?\))\s*(<|<=|>|>=|==|===|!=)\s*-?\d+(\.\d+)?$/;
const METRIC = /^[a-z_][a-z0-9_]*(\{[A-Za-z_][\w-]*:[^{}]+\})?$/;

const script = path.resolve(process.argv[2]);
const iterations = Number(process.argv[3] || 2);
const problems = [];

globalThis.__ENV = Object.assign({ ORGS: '2', BATCH: '5' }, process.env);
globalThis.__VU = 1;
globalThis.__ITER = 0;
globalThis.open = (file) => readFileSync(path.resolve(path.dirname(script), file), 'utf8');

const module = await import(pathToFileURL(script).href);
const options = module.options || {};
for (const [name, scenario] of Object.entries(options.scenarios || {})) {
  if (!EXECUTORS.has(scenario.executor)) problems.push(`scenario ${name}: unknown executor ${scenario.executor}`);
  const exec = scenario.exec || 'default';
  if (typeof module[exec] !== 'function') problems.push(`scenario ${name}: no exported function ${exec}`);
}
for (const [metric, rules] of Object.entries(options.thresholds || {})) {
  if (!METRIC.test(metric)) problems.push(`threshold on ${metric}: not a metric k6 knows how to select`);
  for (const rule of rules) {
    const text = typeof rule === 'string' ? rule : rule.threshold;
    if (!THRESHOLD.test(text)) problems.push(`threshold ${metric}: ${JSON.stringify(text)} is not a k6 threshold expression`);
  }
}
if (typeof module.handleSummary !== 'function') problems.push('no handleSummary (the runs must leave JSON behind)');

const data = module.setup ? module.setup() : undefined;
const scenarios = Object.entries(options.scenarios || { default: {} });
let ran = 0;
for (const [, scenario] of scenarios) {
  const fn = module[scenario.exec || 'default'];
  const n = Math.min(iterations, scenario.iterations || iterations);
  for (let i = 0; i < n; i++) {
    globalThis.__ITER = i;
    fn(data);
    ran += 1;
  }
}
if (module.teardown) module.teardown(data);

// A summary shaped like k6's, from what was recorded, handed to handleSummary.
const values = (name) => (registry.metrics.get(name) || { values: [] }).values;
const sorted = values('http_req_duration').slice().sort((a, b) => a - b);
const pct = (p) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] : 0);
const summaryData = { metrics: {} };
for (const [name, metric] of registry.metrics) {
  const v = metric.values;
  summaryData.metrics[name] = { type: metric.type, values: metric.type === 'rate'
    ? { rate: v.reduce((a, b) => a + b, 0) / Math.max(1, v.length) }
    : { count: v.reduce((a, b) => a + b, 0), avg: v.reduce((a, b) => a + b, 0) / Math.max(1, v.length), 'p(95)': pct(95), 'p(99)': pct(99) } };
}
summaryData.metrics.http_reqs = { type: 'counter', values: { count: registry.requests.length } };
summaryData.metrics.dropped_iterations = { type: 'counter', values: { count: 0 } };
if (module.handleSummary) {
  process.env.SUMMARY_DIR = globalThis.__ENV.SUMMARY_DIR = globalThis.__ENV.SUMMARY_DIR || mkdtempSync(path.join(tmpdir(), 'k6-standin-'));
  const outputs = module.handleSummary(summaryData);
  for (const [target, content] of Object.entries(outputs || {})) {
    if (typeof content !== 'string') problems.push(`handleSummary: ${target} is not a string`);
    else if (target !== 'stdout' && target !== 'stderr') writeFileSync(target, content);
  }
  if (!Object.keys(outputs || {}).some((t) => t.endsWith('.json'))) problems.push('handleSummary writes no JSON file');
}

let passes = 0;
for (const [name, { passes: p, fails }] of registry.checks) {
  passes += p;
  if (fails) problems.push(`check "${name}" failed ${fails} of ${p + fails} times`);
}
const failed = registry.requests.filter((r) => r.failed);
for (const r of failed.slice(0, 5)) problems.push(`request "${r.name}" answered ${r.status}, which the script does not expect`);
const name = path.basename(script);
console.log(`${name}: ${ran} iterations, ${registry.requests.length} requests (${failed.length} unexpected), `
  + `${passes} checks passed${problems.length ? `, ${problems.length} problems` : ''}`);
for (const problem of problems) console.log(`  ${name}: ${problem}`);
process.exit(problems.length ? 1 : 0);
