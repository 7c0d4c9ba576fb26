// `node --import ./standin/register.mjs standin/run.mjs SCRIPT`: maps the k6 modules the scripts
// import ('k6', 'k6/http', 'k6/metrics') to the small stand-ins in this folder, so `make test` can
// run each script's setup/default/teardown/handleSummary against the real local stack without k6
// (AGPL: the project does not install or run it).
import { register } from 'node:module';

register('./hooks.mjs', import.meta.url);
