// Stand-in for 'k6/http', synchronous like k6's: each request is made by curl (real HTTP against
// the real services). Supports what Tally's scripts use: get/post/put/del/request, headers, tags,
// `compression: 'gzip'`, responseCallback / expectedStatuses, res.status/body/headers/json(path).
import { execFileSync } from 'node:child_process';
import zlib from 'node:zlib';
import { registry, record } from './registry.mjs';

let defaultCallback = expectedStatuses({ min: 200, max: 399 });

export function expectedStatuses(...codes) {
  const accepts = (status) => codes.some((c) => (typeof c === 'number' ? c === status : status >= c.min && status <= c.max));
  return { accepts };
}

export function setResponseCallback(callback) {
  defaultCallback = callback;
}

function jsonPath(body, path) {
  const value = JSON.parse(body);
  if (path === undefined) return value;
  return String(path).split('.').reduce((v, key) => (v === undefined || v === null ? undefined : v[key]), value);
}

export function request(method, url, body, params = {}) {
  const headers = Object.assign({ Expect: '' }, params.headers || {});
  let data = null;
  if (body !== undefined && body !== null) data = Buffer.from(typeof body === 'string' ? body : JSON.stringify(body));
  if (params.compression === 'gzip' && data) {
    data = zlib.gzipSync(data);
    headers['Content-Encoding'] = 'gzip';
  } else if (params.compression) {
    throw new Error(`compression ${params.compression}: the stand-in knows gzip only`);
  }
  const args = ['-sS', '-i', '--max-time', '60', '-X', method];
  for (const [k, v] of Object.entries(headers)) args.push('-H', `${k}: ${v}`);
  if (data) args.push('--data-binary', '@-');
  args.push(url);
  const started = Date.now();
  const out = execFileSync('curl', args, { input: data || undefined, maxBuffer: 256 * 1024 * 1024 });
  const ms = Date.now() - started;
  // Skip interim answers (100 Continue), then split the head from the body.
  let rest = out;
  let head = '';
  for (;;) {
    const end = rest.indexOf('\r\n\r\n');
    head = rest.subarray(0, end).toString('latin1');
    rest = rest.subarray(end + 4);
    if (!/^HTTP\/[\d.]+ 1\d\d/.test(head)) break;
  }
  const [statusLine, ...lines] = head.split('\r\n');
  const status = Number(statusLine.split(' ')[1]);
  const resHeaders = {};
  for (const line of lines) {
    const at = line.indexOf(':');
    if (at > 0) resHeaders[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  const text = rest.toString('utf8');
  const callback = params.responseCallback || defaultCallback;
  const failed = !callback.accepts(status);
  const name = (params.tags && params.tags.name) || `${method} ${url}`;
  registry.requests.push({ name, status, failed, ms });
  record('http_req_duration', 'trend', ms);
  record('http_req_failed', 'rate', failed ? 1 : 0);
  return { status, body: text, headers: resHeaders, timings: { duration: ms }, url, json: (path) => jsonPath(text, path) };
}

export const get = (url, params) => request('GET', url, null, params);
export const post = (url, body, params) => request('POST', url, body, params);
export const put = (url, body, params) => request('PUT', url, body, params);
export const del = (url, body, params) => request('DELETE', url, body, params);

export default { request, get, post, put, del, expectedStatuses, setResponseCallback };
