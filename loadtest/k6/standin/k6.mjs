// Stand-in for k6's 'k6' module: check, fail, sleep, group.
import { registry } from './registry.mjs';

export function check(value, sets) {
  let all = true;
  for (const [name, fn] of Object.entries(sets)) {
    let ok = false;
    try { ok = Boolean(fn(value)); } catch (error) { ok = false; }
    const entry = registry.checks.get(name) || { passes: 0, fails: 0 };
    if (ok) entry.passes += 1; else entry.fails += 1;
    registry.checks.set(name, entry);
    all = all && ok;
  }
  return all;
}

export function fail(message) {
  throw new Error(`fail(): ${message}`);
}

export function sleep(seconds) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, Math.max(0, seconds * 1000));
}

export function group(name, fn) {
  return fn();
}

export default { check, fail, sleep, group };
