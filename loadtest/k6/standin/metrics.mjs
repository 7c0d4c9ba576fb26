// Stand-in for 'k6/metrics': values are recorded for the run's summary.
import { record } from './registry.mjs';

class Metric {
  constructor(name, type) { this.name = name; this.type = type; }
  add(value) {
    if (typeof value !== 'number' && typeof value !== 'boolean') throw new Error(`${this.name}.add(${value}): not a number`);
    record(this.name, this.type, Number(value));
  }
}

export class Counter extends Metric { constructor(name) { super(name, 'counter'); } }
export class Trend extends Metric { constructor(name) { super(name, 'trend'); } }
export class Rate extends Metric { constructor(name) { super(name, 'rate'); } }
export class Gauge extends Metric { constructor(name) { super(name, 'gauge'); } }
