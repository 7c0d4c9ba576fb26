const STANDINS = { k6: 'k6.mjs', 'k6/http': 'http.mjs', 'k6/metrics': 'metrics.mjs' };

export async function resolve(specifier, context, next) {
  if (Object.hasOwn(STANDINS, specifier)) {
    return { url: new URL(STANDINS[specifier], import.meta.url).href, shortCircuit: true };
  }
  if (specifier.startsWith('k6/') || specifier.startsWith('http://') || specifier.startsWith('https://')) {
    throw new Error(`${specifier}: not stood in (and remote imports are not allowed in Tally's k6 scripts)`);
  }
  return next(specifier, context);
}
