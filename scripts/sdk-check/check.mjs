// Checks keel's mock LLM server (`keel mock`, docs/mock_llm_server.md) against the official
// provider SDKs used as clients: openai, @anthropic-ai/sdk, @aws-sdk/client-bedrock-runtime.
//
//   MOCK_URL=http://127.0.0.1:PORT node check.mjs     (run.sh starts the mock and sets it)
//
// The mock must have been started with scenario.json and must not have served these models
// before (the scripts are consumed per model). Prints one PASS/FAIL line per check and exits 1 if
// any check failed. On a failure, the responses the mock sent for that model (status, headers,
// body) are printed under the FAIL line.

import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import {
  BedrockRuntimeClient,
  ConverseCommand,
  ConverseStreamCommand,
} from '@aws-sdk/client-bedrock-runtime';
import { NodeHttpHandler } from '@smithy/node-http-handler';

const BASE = process.env.MOCK_URL;
if (!BASE) {
  console.error('MOCK_URL is not set (run run.sh, or start `keel mock` and export MOCK_URL)');
  process.exit(2);
}

// ---------------------------------------------------------------------------------------------
// Recording transport: every request an SDK makes goes through here, so a check can count the
// SDK's attempts and show exactly what the mock answered.

const seen = new Map(); // model -> [{status, headers, body}]
function record(model, status, headers, body) {
  if (!seen.has(model)) seen.set(model, []);
  seen.get(model).push({ status, headers, body });
}
const attempts = (model) => (seen.get(model) ?? []).length;

async function recordingFetch(url, init) {
  let model = '?';
  let stream = false;
  try {
    const req = JSON.parse(init?.body ?? '{}');
    model = req.model ?? '?';
    stream = req.stream === true;
  } catch { /* not JSON */ }
  const res = await fetch(url, init);
  const headers = Object.fromEntries(res.headers.entries());
  const body = res.clone().text();
  if (stream) {
    // A stream goes to the SDK at once, to be consumed as it arrives; its copy is recorded when
    // it ends (a stream cut short is recorded as such).
    body.then((b) => record(model, res.status, headers, b),
      (e) => record(model, res.status, headers, `(stream cut: ${e?.message ?? e})`));
    return res;
  }
  record(model, res.status, headers, await body);
  return res;
}

// Bedrock: wrap an HTTP/1.1 handler (the mock speaks HTTP/1.1 only; the Bedrock Runtime client
// defaults to NodeHttp2Handler, see the h2 check below).
class RecordingHandler {
  constructor() { this.inner = new NodeHttpHandler(); }
  async handle(request, options) {
    const m = /^\/model\/([^/]+)\/converse/.exec(request.path);
    const model = m ? decodeURIComponent(m[1]) : '?';
    const out = await this.inner.handle(request, options);
    const chunks = [];
    for await (const c of out.response.body) chunks.push(Buffer.from(c));
    const buf = Buffer.concat(chunks);
    record(model, out.response.statusCode, { ...out.response.headers }, buf.toString('utf8'));
    const { Readable } = await import('node:stream');
    out.response.body = Readable.from([buf]);
    return out;
  }
  updateHttpClientConfig(k, v) { this.inner.updateHttpClientConfig(k, v); }
  httpHandlerConfigs() { return this.inner.httpHandlerConfigs(); }
  destroy() { this.inner.destroy(); }
}

// ---------------------------------------------------------------------------------------------
// Harness

let failed = 0;
let passed = 0;
async function check(name, models, fn) {
  try {
    const detail = await fn();
    passed++;
    console.log(`PASS ${name}${detail ? ` (${detail})` : ''}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e?.message ?? e}`);
    for (const model of models) {
      for (const [i, r] of (seen.get(model) ?? []).entries()) {
        console.log(`     ${model} #${i + 1}: ${r.status} ${JSON.stringify(r.headers)} ${r.body.slice(0, 600)}`);
      }
    }
  }
}
function expect(cond, what) {
  if (!cond) throw new Error(what);
}
function eq(actual, expected, what) {
  if (actual !== expected) {
    throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  }
}
async function thrown(promise) {
  try {
    const v = await promise;
    throw new Error(`expected an error, got a result: ${JSON.stringify(v).slice(0, 300)}`);
  } catch (e) {
    if (e?.message?.startsWith('expected an error')) throw e;
    return e;
  }
}
async function timed(fn) {
  const t0 = performance.now();
  const v = await fn();
  return [v, performance.now() - t0];
}

// A small JSON Schema validator (the subset strict structured outputs use), independent of the
// mock's own instance generator.
function validate(schema, value, root = schema, path = '$') {
  if (schema.$ref) {
    const m = /^#\/(\$defs|definitions)\/(.+)$/.exec(schema.$ref);
    expect(m, `${path}: unsupported $ref ${schema.$ref}`);
    return validate(root[m[1]][m[2]], value, root, path);
  }
  if (schema.anyOf) {
    const errs = [];
    for (const s of schema.anyOf) {
      try { validate(s, value, root, path); return; } catch (e) { errs.push(e.message); }
    }
    throw new Error(`${path}: matches no anyOf branch (${errs.join('; ')})`);
  }
  const typeOf = (v) => v === null ? 'null' : Array.isArray(v) ? 'array'
    : Number.isInteger(v) ? 'integer' : typeof v;
  if (schema.type) {
    const types = [].concat(schema.type);
    const t = typeOf(value);
    expect(types.includes(t) || (t === 'integer' && types.includes('number')),
      `${path}: type ${t}, schema wants ${types.join('|')}`);
  }
  if (schema.enum) expect(schema.enum.includes(value), `${path}: ${JSON.stringify(value)} not in enum`);
  if ('const' in schema) expect(value === schema.const, `${path}: not the const`);
  if (typeof value === 'number') {
    if (schema.minimum !== undefined) expect(value >= schema.minimum, `${path}: below minimum`);
    if (schema.maximum !== undefined) expect(value <= schema.maximum, `${path}: above maximum`);
  }
  if (typeof value === 'string' && schema.minLength !== undefined) {
    expect(value.length >= schema.minLength, `${path}: shorter than minLength`);
  }
  if (Array.isArray(value)) {
    if (schema.minItems !== undefined) expect(value.length >= schema.minItems, `${path}: fewer than minItems`);
    if (schema.items) value.forEach((v, i) => validate(schema.items, v, root, `${path}[${i}]`));
  }
  if (typeOf(value) === 'object') {
    for (const k of schema.required ?? []) expect(k in value, `${path}: required "${k}" missing`);
    for (const [k, v] of Object.entries(value)) {
      if (schema.properties?.[k]) validate(schema.properties[k], v, root, `${path}.${k}`);
      else expect(schema.additionalProperties !== false, `${path}: additional property "${k}"`);
    }
  }
}

const messages = [{ role: 'user', content: 'Say something.' }];
// The mock's reply to `messages`, and its chunks: 4 bytes each (stream_settings' default).
const REPLY = 'mock answer to: Say something.';
const REPLY_CHUNKS = Math.ceil(REPLY.length / 4);

// Records when each text delta reached the SDK's consumer: with chunk_latency_ms 25 in
// scenario.json, deltas that arrive spread over >= 100 ms show that the mock flushes every chunk
// and that the SDK hands them on as they arrive (not after the body ended).
function pacing() {
  const times = [];
  return {
    tick() { times.push(performance.now()); },
    check(what) {
      expect(times.length === REPLY_CHUNKS, `${what}: ${times.length} text deltas, expected ${REPLY_CHUNKS}`);
      const spread = times[times.length - 1] - times[0];
      expect(spread >= 100, `${what}: text deltas arrived within ${spread.toFixed(0)} ms (buffered?)`);
      return `${times.length} deltas over ${spread.toFixed(0)} ms`;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// OpenAI

const openai = new OpenAI({ apiKey: 'sk-mock', baseURL: `${BASE}/v1`, maxRetries: 2, fetch: recordingFetch });

const orderSchema = {
  type: 'object',
  properties: {
    name: { type: 'string' },
    quantity: { type: 'integer', minimum: 1 },
    status: { type: 'string', enum: ['pending', 'shipped', 'delivered'] },
    lines: { type: 'array', minItems: 1, items: { $ref: '#/$defs/line' } },
    customer: { $ref: '#/$defs/customer' },
    note: { anyOf: [{ type: 'string' }, { type: 'null' }] },
  },
  required: ['name', 'quantity', 'status', 'lines', 'customer', 'note'],
  additionalProperties: false,
  $defs: {
    line: {
      type: 'object',
      properties: { sku: { type: 'string' }, price: { type: 'number' }, gift: { type: 'boolean' } },
      required: ['sku', 'price', 'gift'],
      additionalProperties: false,
    },
    customer: {
      type: 'object',
      properties: {
        id: { type: 'string' },
        tier: { type: 'string', enum: ['free', 'pro'] },
        tags: { type: 'array', items: { type: 'string' } },
      },
      required: ['id', 'tier', 'tags'],
      additionalProperties: false,
    },
  },
};

await check('openai chat.completions.parse() strict json_schema -> message.parsed validates against the schema',
  ['oa-structured'], async () => {
    const c = await openai.chat.completions.parse({
      model: 'oa-structured',
      messages,
      response_format: { type: 'json_schema', json_schema: { name: 'order', strict: true, schema: orderSchema } },
    });
    const msg = c.choices[0].message;
    expect(msg.parsed && typeof msg.parsed === 'object', `message.parsed is ${JSON.stringify(msg.parsed)} (content ${JSON.stringify(msg.content)})`);
    validate(orderSchema, msg.parsed);
    eq(c.choices[0].finish_reason, 'stop', 'finish_reason');
    return `parsed ${JSON.stringify(msg.parsed)}`;
  });

await check('openai response_format json_object -> content "{}" parses to {}', ['oa-json-object'], async () => {
  const c = await openai.chat.completions.create({
    model: 'oa-json-object', messages, response_format: { type: 'json_object' },
  });
  const content = c.choices[0].message.content;
  const v = JSON.parse(content);
  expect(v && typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length === 0, `content ${JSON.stringify(content)}`);
  return `content ${content}`;
});

await check('openai success exposes the x-request-id as _request_id', ['oa-request-id'], async () => {
  const c = await openai.chat.completions.create({ model: 'oa-request-id', messages });
  expect(typeof c._request_id === 'string' && c._request_id.length > 0, `_request_id ${JSON.stringify(c._request_id)}`);
  expect(c.choices[0].message.content.startsWith('mock answer to: '), `content ${JSON.stringify(c.choices[0].message.content)}`);
  return `_request_id ${c._request_id}`;
});

await check('openai 429 (retry-after-ms 50) then ok -> SDK retries once after ~50 ms and succeeds',
  ['oa-429-then-ok'], async () => {
    const [c, ms] = await timed(() => openai.chat.completions.create({ model: 'oa-429-then-ok', messages }));
    eq(attempts('oa-429-then-ok'), 2, 'requests sent');
    eq(seen.get('oa-429-then-ok')[0].status, 429, 'first status');
    expect(c.choices[0].message.content, 'no content');
    // SDK default backoff without a header is >= 375 ms: staying under it shows retry-after-ms was used.
    expect(ms >= 50 && ms < 350, `took ${ms.toFixed(0)} ms (retry-after-ms 50 not honoured?)`);
    return `2 requests, ${ms.toFixed(0)} ms`;
  });

await check('openai 503 x3 -> after 2 retries APIError 503 type service_unavailable_error code server_is_overloaded, requestID set',
  ['oa-503'], async () => {
    const e = await thrown(openai.chat.completions.create({ model: 'oa-503', messages }));
    expect(e instanceof OpenAI.APIError, `not an APIError: ${e}`);
    eq(e.status, 503, 'status');
    eq(e.type, 'service_unavailable_error', 'error.type');
    eq(e.code, 'server_is_overloaded', 'error.code');
    eq(attempts('oa-503'), 3, 'requests sent (1 + maxRetries 2)');
    expect(e.requestID, `requestID ${e.requestID}`);
    return `requestID ${e.requestID}`;
  });

await check('openai timeout -> APIError 504 (InternalServerError) type server_error code timeout',
  ['oa-timeout'], async () => {
    const e = await thrown(openai.chat.completions.create({ model: 'oa-timeout', messages }, { maxRetries: 0 }));
    expect(e instanceof OpenAI.InternalServerError, `not an InternalServerError: ${e?.constructor?.name} ${e}`);
    eq(e.status, 504, 'status');
    eq(e.type, 'server_error', 'error.type');
    eq(e.code, 'timeout', 'error.code');
    expect(e.requestID, `requestID ${e.requestID}`);
  });

await check('openai content_filter -> 200 with finish_reason "content_filter" and content null',
  ['oa-content-filter'], async () => {
    const c = await openai.chat.completions.create({ model: 'oa-content-filter', messages });
    eq(seen.get('oa-content-filter')[0].status, 200, 'status');
    eq(c.choices[0].finish_reason, 'content_filter', 'finish_reason');
    eq(c.choices[0].message.content, null, 'message.content');
  });

await check('openai stream: true + include_usage -> chunks reassemble the text, finish_reason stop, usage chunk, paced',
  ['oa-stream'], async () => {
    const stream = await openai.chat.completions.create({
      model: 'oa-stream', messages, stream: true, stream_options: { include_usage: true },
    });
    const pace = pacing();
    let text = '';
    let role = null;
    let finish = null;
    let usage = null;
    for await (const chunk of stream) {
      eq(chunk.object, 'chat.completion.chunk', 'object');
      const c = chunk.choices[0];
      if (c?.delta?.role) role = c.delta.role;
      if (c?.delta?.content) { text += c.delta.content; pace.tick(); }
      if (c?.finish_reason) finish = c.finish_reason;
      if (chunk.usage) {
        eq(chunk.choices.length, 0, 'choices of the usage chunk');
        usage = chunk.usage;
      }
    }
    eq(role, 'assistant', 'delta.role');
    eq(text, REPLY, 'text');
    eq(finish, 'stop', 'finish_reason');
    expect(usage, 'no usage chunk');
    eq(usage.completion_tokens, REPLY_CHUNKS, 'usage.completion_tokens');
    eq(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens, 'usage.total_tokens');
    return pace.check('openai');
  });

await check('openai chat.completions.stream() helper -> finalChatCompletion() has the text, stop and usage',
  ['oa-stream-helper'], async () => {
    const runner = openai.chat.completions.stream({
      model: 'oa-stream-helper', messages, stream_options: { include_usage: true },
    });
    let deltas = '';
    runner.on('content', (delta) => { deltas += delta; });
    const c = await runner.finalChatCompletion();
    eq(c.choices[0].message.content, REPLY, 'message.content');
    eq(c.choices[0].message.role, 'assistant', 'message.role');
    eq(c.choices[0].finish_reason, 'stop', 'finish_reason');
    eq(deltas, REPLY, 'content events');
    eq(c.usage?.completion_tokens, REPLY_CHUNKS, 'usage.completion_tokens');
  });

await check('openai stream: 429 before the stream (retry-after-ms 50) -> SDK retries and streams',
  ['oa-stream-429-then-ok'], async () => {
    const stream = await openai.chat.completions.create({ model: 'oa-stream-429-then-ok', messages, stream: true });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
    eq(text, REPLY, 'text');
    eq(seen.get('oa-stream-429-then-ok')?.[0]?.status, 429, 'first status');
  });

await check('openai stream_error after 2 chunks -> the SDK throws APIError (no status) type server_error after "mock ans"',
  ['oa-stream-error'], async () => {
    const stream = await openai.chat.completions.create({ model: 'oa-stream-error', messages, stream: true });
    let text = '';
    const e = await thrown((async () => {
      for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
    })());
    expect(e instanceof OpenAI.APIError, `not an APIError: ${e?.constructor?.name} ${e}`);
    eq(e.status, undefined, 'status');
    eq(e.type, 'server_error', 'error.type');
    eq(text, REPLY.slice(0, 8), 'text before the error');
    return `${e.constructor.name}: ${e.message}`;
  });

// ---------------------------------------------------------------------------------------------
// Anthropic

const anthropic = new Anthropic({ apiKey: 'sk-ant-mock', baseURL: BASE, maxRetries: 2, fetch: recordingFetch });

await check('anthropic messages.create success -> text content, stop_reason end_turn, _request_id',
  ['claude-ok'], async () => {
    const m = await anthropic.messages.create({ model: 'claude-ok', max_tokens: 64, messages });
    eq(m.type, 'message', 'type');
    eq(m.content[0]?.type, 'text', 'content[0].type');
    expect(m.content[0].text.startsWith('mock answer to: '), `text ${JSON.stringify(m.content[0].text)}`);
    eq(m.stop_reason, 'end_turn', 'stop_reason');
    expect(m._request_id, `_request_id ${m._request_id}`);
    return `_request_id ${m._request_id}`;
  });

await check('anthropic 529 x3 -> after 2 retries OverloadedError 529, error.error.type overloaded_error, requestID = body request_id',
  ['claude-529'], async () => {
    const e = await thrown(anthropic.messages.create({ model: 'claude-529', max_tokens: 64, messages }));
    expect(e instanceof Anthropic.APIError, `not an APIError: ${e}`);
    expect(e instanceof Anthropic.OverloadedError, `not an OverloadedError: ${e?.constructor?.name}`);
    eq(e.status, 529, 'status');
    eq(e.error?.type, 'error', 'body type');
    eq(e.error?.error?.type, 'overloaded_error', 'error.error.type');
    eq(e.type, 'overloaded_error', 'err.type');
    eq(attempts('claude-529'), 3, 'requests sent (1 + maxRetries 2)');
    expect(e.requestID, `requestID ${e.requestID}`);
    eq(e.error?.request_id, e.requestID, 'body request_id vs request-id header');
    return `requestID ${e.requestID}`;
  });

await check('anthropic 429 with retry-after only (no retry-after-ms) -> SDK waits the header\'s 1 s, retries, succeeds',
  ['claude-429-then-ok'], async () => {
    const [m, ms] = await timed(() => anthropic.messages.create({ model: 'claude-429-then-ok', max_tokens: 64, messages }));
    const log = seen.get('claude-429-then-ok');
    eq(log.length, 2, 'requests sent');
    eq(log[0].status, 429, 'first status');
    eq(log[0].headers['retry-after'], '1', 'retry-after header (50 ms rounded up to whole seconds)');
    eq(log[0].headers['retry-after-ms'], undefined, 'retry-after-ms header');
    eq(JSON.parse(log[0].body).error?.type, 'rate_limit_error', '429 body error.type');
    expect(JSON.parse(log[0].body).request_id, '429 body has no request_id');
    // The SDK's own first backoff is 375..500 ms; >= 950 ms shows it used retry-after.
    expect(ms >= 950 && ms < 3000, `took ${ms.toFixed(0)} ms`);
    eq(m.content[0]?.type, 'text', 'content[0].type');
    return `2 requests, ${ms.toFixed(0)} ms`;
  });

await check('anthropic messages.stream() -> finalMessage() text, end_turn, usage; text events paced',
  ['claude-stream'], async () => {
    const pace = pacing();
    let deltas = '';
    const stream = anthropic.messages.stream({ model: 'claude-stream', max_tokens: 64, messages });
    stream.on('text', (t) => { deltas += t; pace.tick(); });
    const m = await stream.finalMessage();
    eq(m.role, 'assistant', 'role');
    eq(m.content.length, 1, 'content blocks');
    eq(m.content[0].type, 'text', 'content[0].type');
    eq(m.content[0].text, REPLY, 'content[0].text');
    eq(deltas, REPLY, 'text events');
    eq(m.stop_reason, 'end_turn', 'stop_reason');
    eq(m.usage.output_tokens, REPLY_CHUNKS, 'usage.output_tokens');
    expect(m.usage.input_tokens > 0, `usage.input_tokens ${m.usage.input_tokens}`);
    return pace.check('anthropic');
  });

await check('anthropic stream event: error overloaded_error after 2 chunks -> APIError type overloaded_error, requestID',
  ['claude-stream-overloaded'], async () => {
    let deltas = '';
    const stream = anthropic.messages.stream({ model: 'claude-stream-overloaded', max_tokens: 64, messages });
    stream.on('text', (t) => { deltas += t; });
    stream.on('error', () => { /* finalMessage() rejects with it */ });
    const e = await thrown(stream.finalMessage());
    expect(e instanceof Anthropic.APIError, `not an APIError: ${e?.constructor?.name} ${e}`);
    eq(e.type, 'overloaded_error', 'err.type');
    eq(e.error?.error?.type, 'overloaded_error', 'error.error.type');
    eq(e.status, undefined, 'status (an error event has none)');
    expect(e.requestID, `requestID ${e.requestID}`);
    eq(deltas, REPLY.slice(0, 8), 'text before the error');
    return `${e.constructor.name}: ${e.message}`;
  });

// ---------------------------------------------------------------------------------------------
// Bedrock Converse

const bedrock = new BedrockRuntimeClient({
  region: 'us-east-1',
  endpoint: BASE,
  credentials: { accessKeyId: 'AKIDMOCK', secretAccessKey: 'mock-secret' },
  requestHandler: new RecordingHandler(),
  // default retryMode "standard", maxAttempts 3
});
const converse = (modelId) => bedrock.send(new ConverseCommand({
  modelId,
  messages: [{ role: 'user', content: [{ text: 'Say something.' }] }],
}));

await check('bedrock ConverseCommand success -> output.message.content[0].text, stopReason, usage',
  ['br-ok'], async () => {
    const r = await converse('br-ok');
    const text = r.output?.message?.content?.[0]?.text;
    expect(typeof text === 'string' && text.startsWith('mock answer to: '), `text ${JSON.stringify(text)}`);
    eq(r.stopReason, 'end_turn', 'stopReason');
    expect(r.usage?.totalTokens > 0, `usage ${JSON.stringify(r.usage)}`);
    eq(r.$metadata.httpStatusCode, 200, 'httpStatusCode');
    expect(r.$metadata.requestId, `$metadata.requestId ${r.$metadata.requestId}`);
    return `requestId ${r.$metadata.requestId}`;
  });

await check('bedrock ThrottlingException then ok -> SDK retries (standard mode) and succeeds, attempts 2',
  ['br-throttle-then-ok'], async () => {
    const r = await converse('br-throttle-then-ok');
    eq(r.$metadata.attempts, 2, '$metadata.attempts');
    eq(seen.get('br-throttle-then-ok')[0].status, 429, 'first status');
    expect(r.output?.message?.content?.[0]?.text, 'no text');
  });

await check('bedrock 429 x3 -> ThrottlingException, $metadata.attempts 3, 429s carry no retry-after header',
  ['br-throttle'], async () => {
    const e = await thrown(converse('br-throttle'));
    eq(e.name, 'ThrottlingException', 'err.name');
    eq(e.$metadata?.httpStatusCode, 429, 'httpStatusCode');
    eq(e.$metadata?.attempts, 3, '$metadata.attempts');
    for (const r of seen.get('br-throttle')) {
      for (const h of ['retry-after', 'retry-after-ms', 'x-amz-retry-after']) {
        eq(r.headers[h], undefined, `${h} header on a scripted Bedrock 429`);
      }
    }
    expect(e.$metadata?.requestId, `requestId ${e.$metadata?.requestId}`);
    return `attempts ${e.$metadata.attempts}, message ${JSON.stringify(e.message)}`;
  });

await check('bedrock context_length -> ValidationException 400, not retried',
  ['br-context-length'], async () => {
    const e = await thrown(converse('br-context-length'));
    eq(e.name, 'ValidationException', 'err.name');
    eq(e.$metadata?.httpStatusCode, 400, 'httpStatusCode');
    eq(e.$metadata?.attempts, 1, '$metadata.attempts');
    expect(/too long/i.test(e.message), `message ${JSON.stringify(e.message)}`);
    return `message ${JSON.stringify(e.message)}`;
  });

// Streams: a plain HTTP/1.1 handler, so that the SDK decodes the event stream as it arrives (the
// recording handler above buffers bodies).
const bedrockStream = new BedrockRuntimeClient({
  region: 'us-east-1',
  endpoint: BASE,
  credentials: { accessKeyId: 'AKIDMOCK', secretAccessKey: 'mock-secret' },
  requestHandler: new NodeHttpHandler(),
});
const converseStream = (modelId) => bedrockStream.send(new ConverseStreamCommand({
  modelId,
  messages: [{ role: 'user', content: [{ text: 'Say something.' }] }],
}));

await check('bedrock ConverseStreamCommand -> messageStart, text deltas, messageStop end_turn, metadata usage; paced',
  ['br-stream'], async () => {
    const r = await converseStream('br-stream');
    eq(r.$metadata.httpStatusCode, 200, 'httpStatusCode');
    const pace = pacing();
    const order = [];
    let text = '';
    let stop = null;
    let meta = null;
    for await (const ev of r.stream) {
      const kind = Object.keys(ev).find((k) => ev[k] !== undefined);
      if (order[order.length - 1] !== kind) order.push(kind);
      if (ev.messageStart) eq(ev.messageStart.role, 'assistant', 'messageStart.role');
      if (ev.contentBlockDelta) { text += ev.contentBlockDelta.delta?.text ?? ''; pace.tick(); }
      if (ev.messageStop) stop = ev.messageStop.stopReason;
      if (ev.metadata) meta = ev.metadata;
    }
    eq(order.join(','), 'messageStart,contentBlockDelta,contentBlockStop,messageStop,metadata', 'event order');
    eq(text, REPLY, 'text');
    eq(stop, 'end_turn', 'stopReason');
    eq(meta?.usage?.outputTokens, REPLY_CHUNKS, 'metadata.usage.outputTokens');
    eq(meta.usage.totalTokens, meta.usage.inputTokens + meta.usage.outputTokens, 'metadata.usage.totalTokens');
    expect(typeof meta.metrics?.latencyMs === 'number', `metadata.metrics ${JSON.stringify(meta.metrics)}`);
    return pace.check('bedrock');
  });

for (const [model, name] of [['br-stream-throttled', 'ThrottlingException'],
  ['br-stream-model-error', 'ModelStreamErrorException']]) {
  await check(`bedrock stream exception after 2 chunks -> iterating the stream throws ${name}`,
    [model], async () => {
      const r = await converseStream(model);
      let text = '';
      const e = await thrown((async () => {
        for await (const ev of r.stream) text += ev.contentBlockDelta?.delta?.text ?? '';
      })());
      eq(e.name, name, 'err.name');
      eq(text, REPLY.slice(0, 8), 'text before the exception');
      return `${e.name}: ${e.message}`;
    });
}

// Not a check: the Bedrock Runtime client's default transport is NodeHttp2Handler, which over an
// http:// endpoint speaks HTTP/2 with prior knowledge (h2c). The mock is HTTP/1.1 only, so a
// client must be given an HTTP/1.1 handler (as above). Report what the default does.
{
  const h2 = new BedrockRuntimeClient({
    region: 'us-east-1', endpoint: BASE, maxAttempts: 1,
    credentials: { accessKeyId: 'AKIDMOCK', secretAccessKey: 'mock-secret' },
  });
  try {
    await h2.send(new ConverseCommand({ modelId: 'br-h2', messages: [{ role: 'user', content: [{ text: 'hi' }] }] }),
      { abortSignal: AbortSignal.timeout(5000) });
    console.log('INFO bedrock with the default NodeHttp2Handler: answered (HTTP/2 works)');
  } catch (e) {
    console.log(`INFO bedrock with the default NodeHttp2Handler fails as expected (mock is HTTP/1.1 only): ${e.name}: ${e.message}`);
  }
  h2.destroy();
}

bedrock.destroy();
bedrockStream.destroy();
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
