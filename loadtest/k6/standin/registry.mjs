// What a stand-in run recorded: checks, requests, custom metrics.
export const registry = {
  checks: new Map(), // name -> { passes, fails }
  requests: [], // { name, status, failed, ms }
  metrics: new Map(), // name -> { type, values: [] }
};

export function record(name, type, value) {
  if (!registry.metrics.has(name)) registry.metrics.set(name, { type, values: [] });
  registry.metrics.get(name).values.push(value);
}
