// Checks the traces keel exports with an OTLP decoder keel did not write: the OpenTelemetry JS
// protobuf schema (@opentelemetry/otlp-transformer's generated ExportTraceServiceRequest).
//
// One batch item that retries twice and falls back once runs through `keel batch --mock`, with
// the config's trace.otlp_endpoint pointed at a collector stand-in here (an HTTP server on
// 127.0.0.1:0) and --trace FILE. Each OTLP/JSON request, from the wire and from the file, is
// read as proto3 JSON (ids in hex, as OTLP/JSON says), encoded to protobuf and decoded again by
// the schema; a field the schema does not know would be lost and fails the check. Then the span
// tree is checked: item -> call -> four attempts, retry and fallback events, GenAI attributes.
// A second run checks `keel serve`: a request with a traceparent yields spans in its trace.
//
// Usage: node check.mjs /path/to/keel
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';

const require = createRequire(import.meta.url);
const root = require('@opentelemetry/otlp-transformer/build/src/generated/root.js');
const Request = root.opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest;

const keel = process.argv[2];
if (!keel) {
  console.error('usage: node check.mjs /path/to/keel');
  process.exit(2);
}

let failed = 0;
function check(name, ok, detail = '') {
  console.log(`${ok ? 'PASS' : 'FAIL'} ${name}${ok || !detail ? '' : ': ' + detail}`);
  if (!ok) failed++;
}

// OTLP/JSON -> protobufjs object: trace and span ids are hex in OTLP/JSON (not base64).
const idFields = new Set(['traceId', 'spanId', 'parentSpanId']);
function fromOtlpJson(v) {
  if (Array.isArray(v)) return v.map(fromOtlpJson);
  if (v && typeof v === 'object') {
    const out = {};
    for (const [k, x] of Object.entries(v)) {
      out[k] = idFields.has(k) ? Buffer.from(x, 'hex') : fromOtlpJson(x);
    }
    return out;
  }
  return v;
}

// Every key of `a` (keel's JSON) must be in `b` (what the schema kept), recursively.
function lostKeys(a, b, where = '') {
  const lost = [];
  if (Array.isArray(a)) {
    a.forEach((x, i) => lost.push(...lostKeys(x, b?.[i], `${where}[${i}]`)));
  } else if (a && typeof a === 'object') {
    for (const k of Object.keys(a)) {
      if (!b || !(k in b)) lost.push(`${where}.${k}`);
      else lost.push(...lostKeys(a[k], b[k], `${where}.${k}`));
    }
  }
  return lost;
}

// Decodes one OTLP/JSON body through protobuf; returns its spans with hex ids and the resource.
function decode(text, label) {
  const json = JSON.parse(text);
  const msg = Request.fromObject(fromOtlpJson(json));
  const bytes = Request.encode(msg).finish();
  const back = Request.toObject(Request.decode(bytes), {
    longs: String, enums: Number, bytes: String, defaults: false,
  });
  const lost = lostKeys(json, back);
  check(`${label}: every field keel wrote is in the OTLP schema`, lost.length === 0, lost.join(', '));
  const hex = (b64) => (b64 ? Buffer.from(b64, 'base64').toString('hex') : '');
  const spans = [];
  for (const rs of back.resourceSpans ?? []) {
    for (const ss of rs.scopeSpans ?? []) {
      for (const s of ss.spans ?? []) {
        const attrs = {};
        for (const a of s.attributes ?? []) {
          const v = a.value;
          attrs[a.key] = v.stringValue ?? v.intValue ?? v.doubleValue ?? v.boolValue ??
            v.arrayValue?.values?.map((x) => x.stringValue);
        }
        spans.push({
          ...s, traceId: hex(s.traceId), spanId: hex(s.spanId), parentSpanId: hex(s.parentSpanId),
          attrs, resource: rs.resource, scope: ss.scope,
        });
      }
    }
  }
  return spans;
}

function run(cmd, args, opts = {}) {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { ...opts, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    p.on('close', (code) => resolve({ code, out }));
  });
}

// A collector stand-in: records each POST /v1/traces.
const received = [];
const collector = http.createServer((req, res) => {
  let body = '';
  req.on('data', (d) => (body += d));
  req.on('end', () => {
    received.push({ method: req.method, url: req.url, headers: req.headers, body });
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end('{}');
  });
});
await new Promise((r) => collector.listen(0, '127.0.0.1', r));
const collectorUrl = `http://127.0.0.1:${collector.address().port}`;

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'keel-trace-check-'));
const secret = 'Bearer trace-check-SECRET-0001';
fs.writeFileSync(path.join(dir, 'scenario.json'), JSON.stringify({
  seed: 1,
  models: { 'tr-primary': { script: ['unavailable', 'unavailable', 'unavailable'] } },
}));
fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({
  config_list: [
    { model: 'tr-primary', api_key: 'sk-trace-check-1' },
    { api_type: 'anthropic', model: 'tr-backup', api_key: 'sk-trace-check-2' },
  ],
  policy: {
    retry: { max_attempts: 3, backoff: { kind: 'constant', base: 0.001 } },
    breaker: { enabled: false },
  },
  trace: { otlp_endpoint: collectorUrl, service_name: 'trace-check' },
}));
fs.writeFileSync(path.join(dir, 'in.jsonl'), JSON.stringify({ id: 'item-1', prompt: 'hi' }) + '\n');

// ---- keel batch ----------------------------------------------------------------------------
const batch = await run(keel, [
  'batch', '--config', path.join(dir, 'config.json'), '--mock', path.join(dir, 'scenario.json'),
  '--in', path.join(dir, 'in.jsonl'), '--out', path.join(dir, 'out.jsonl'),
  '--trace', path.join(dir, 'trace.jsonl'), '--progress', 'none', '--seed', '1',
], { env: { ...process.env, OTEL_EXPORTER_OTLP_HEADERS: `authorization=${encodeURIComponent(secret)}` } });
check('keel batch succeeded', batch.code === 0, batch.out);
check('the export header never appears in keel\'s output', !batch.out.includes('SECRET'));
check('keel POSTed OTLP/JSON to /v1/traces', received.length >= 1 &&
  received.every((r) => r.method === 'POST' && r.url === '/v1/traces' &&
    r.headers['content-type'] === 'application/json'),
  JSON.stringify(received.map((r) => [r.method, r.url, r.headers['content-type']])));
check('the export header from OTEL_EXPORTER_OTLP_HEADERS arrived percent-decoded',
  received.length >= 1 && received[0].headers.authorization === secret);

const wire = received.flatMap((r, i) => decode(r.body, `request ${i + 1}`));
const lines = fs.readFileSync(path.join(dir, 'trace.jsonl'), 'utf8').split('\n').filter(Boolean);
const file = lines.flatMap((l, i) => decode(l, `file line ${i + 1}`));
check('the file holds the same spans as the wire',
  JSON.stringify(file.map((s) => s.spanId).sort()) === JSON.stringify(wire.map((s) => s.spanId).sort()),
  `${file.length} vs ${wire.length}`);

const item = wire.find((s) => s.name === 'keel batch item');
const call = wire.find((s) => s.name === 'chat tr-primary' && s.kind === 1);
const attempts = wire.filter((s) => s.kind === 3).sort((a, b) => Number(a.attrs['keel.attempt']) - Number(b.attrs['keel.attempt']));
check('six spans: the item, the call, four attempts', wire.length === 6 && item && call && attempts.length === 4,
  wire.map((s) => `${s.name}/${s.kind}`).join(', '));
if (item && call && attempts.length === 4) {
  check('one trace', wire.every((s) => s.traceId === item.traceId && s.traceId.length === 32));
  check('the item is the root, with its id', !item.parentSpanId && item.attrs['keel.item.id'] === 'item-1');
  check('the call is the item\'s child', call.parentSpanId === item.spanId);
  check('the attempts are the call\'s children', attempts.every((a) => a.parentSpanId === call.spanId));
  check('three 503s on the primary, then 200 from the fallback',
    JSON.stringify(attempts.map((a) => [a.name, Number(a.attrs['http.response.status_code'])])) ===
      JSON.stringify([['chat tr-primary', 503], ['chat tr-primary', 503], ['chat tr-primary', 503], ['chat tr-backup', 200]]),
    JSON.stringify(attempts.map((a) => [a.name, a.attrs['http.response.status_code']])));
  check('failed attempts have status ERROR and error.type',
    attempts.slice(0, 3).every((a) => a.status?.code === 2 && a.attrs['error.type'] === 'overloaded'));
  check('call events: retry, retry, fallback',
    JSON.stringify((call.events ?? []).map((e) => e.name)) === JSON.stringify(['keel.retry', 'keel.retry', 'keel.fallback']),
    JSON.stringify((call.events ?? []).map((e) => e.name)));
  check('call attributes: 4 attempts, 1 fallback, answered by anthropic',
    Number(call.attrs['keel.attempts']) === 4 && Number(call.attrs['keel.fallbacks']) === 1 &&
      call.attrs['gen_ai.provider.name'] === 'anthropic' && call.attrs['gen_ai.operation.name'] === 'chat' &&
      call.attrs['gen_ai.request.model'] === 'tr-primary' && Number(call.attrs['gen_ai.usage.output_tokens']) > 0,
    JSON.stringify(call.attrs));
  check('call status OK', call.status?.code === 1);
  check('attempts lie within the call', attempts.every((a) =>
    BigInt(a.startTimeUnixNano) >= BigInt(call.startTimeUnixNano) && BigInt(a.endTimeUnixNano) <= BigInt(call.endTimeUnixNano)));
  check('resource service.name and scope', item.resource.attributes.some((a) => a.key === 'service.name' && a.value.stringValue === 'trace-check') &&
    item.scope.name === 'keel');
  check('no prompt or reply text recorded', !JSON.stringify(wire).includes('mock answer') && !JSON.stringify(wire).includes('"hi"'));
}

// ---- keel serve ----------------------------------------------------------------------------
// A request with a traceparent through keel serve in front of keel mock: the gateway's server
// span is the caller's child, in the caller's trace, and the mock's model saw the trace.
const mock = spawn(keel, ['mock', '--port', '0', '--scenario', path.join(dir, 'scenario.json')], { stdio: ['ignore', 'pipe', 'pipe'] });
const mockUrl = await new Promise((resolve) => {
  let out = '';
  mock.stdout.on('data', (d) => {
    out += d;
    const m = out.match(/http:\/\/127\.0\.0\.1:\d+/);
    if (m) resolve(m[0]);
  });
});
fs.writeFileSync(path.join(dir, 'serve.json'), JSON.stringify({
  config_list: [{ model: 'tr-backup', base_url: mockUrl, api_key: 'sk-trace-check-3' }],
}));
const serve = spawn(keel, ['serve', '--config', path.join(dir, 'serve.json'), '--listen', '127.0.0.1:0',
  '--trace', path.join(dir, 'serve-trace.jsonl')], { stdio: ['ignore', 'pipe', 'pipe'] });
const serveUrl = await new Promise((resolve) => {
  let out = '';
  serve.stdout.on('data', (d) => {
    out += d;
    const m = out.match(/http:\/\/127\.0\.0\.1:\d+/);
    if (m) resolve(m[0]);
  });
});
const traceId = '0af7651916cd43dd8448eb211c80319c';
const res = await fetch(`${serveUrl}/v1/chat/completions`, {
  method: 'POST',
  headers: { 'content-type': 'application/json', traceparent: `00-${traceId}-b7ad6b7169203331-01` },
  body: JSON.stringify({ model: 'tr-backup', messages: [{ role: 'user', content: 'hi' }] }),
});
check('keel serve answered 200', res.status === 200, String(res.status));
await res.text();
const stopped = new Promise((r) => serve.on('close', r));
serve.kill('SIGTERM');
await stopped;
mock.kill('SIGTERM');
const served = fs.readFileSync(path.join(dir, 'serve-trace.jsonl'), 'utf8').split('\n').filter(Boolean)
  .flatMap((l, i) => decode(l, `serve file line ${i + 1}`));
const server = served.find((s) => s.kind === 2);
check('keel serve: a server span under the caller\'s span, in its trace',
  server && server.traceId === traceId && server.parentSpanId === 'b7ad6b7169203331' &&
    server.name === 'POST /v1/chat/completions' && Number(server.attrs['http.response.status_code']) === 200,
  JSON.stringify(served.map((s) => [s.name, s.kind, s.traceId, s.parentSpanId])));
check('keel serve: call and attempt spans below it', served.length === 3 &&
  served.every((s) => s.traceId === traceId) &&
  served.some((s) => s.kind === 1 && s.parentSpanId === server?.spanId));

collector.close();
fs.rmSync(dir, { recursive: true, force: true });
console.log(failed ? `${failed} check(s) FAILED` : 'all trace checks passed');
process.exit(failed ? 1 : 0);
