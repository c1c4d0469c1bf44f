// Checks `keel serve` (docs/serve.md) with the official OpenAI Node SDK as its client: the SDK
// points its baseURL at keel, keel calls `keel mock` under the config's policy.
//
//   SERVE_URL=http://127.0.0.1:P LIMITED_URL=http://127.0.0.1:Q node gateway.mjs
//
// run.sh starts the mock (scenario.json: models gw-primary, gw-backup, gw-limited) and two
// gateways: SERVE_URL serves "gw-primary" with "gw-backup" as its fallback (3 attempts each),
// "gw-claude" (an Anthropic-format entry: a second route) and "anthropic.gw-bedrock" (a Bedrock Converse
// entry: a third), LIMITED_URL serves "gw-limited" and "gw-filtered" with one attempt. Prints one PASS/FAIL line per check and exits
// 1 if any failed.

import OpenAI from 'openai';

const SERVE = process.env.SERVE_URL;
const LIMITED = process.env.LIMITED_URL;
if (!SERVE || !LIMITED) {
  console.error('SERVE_URL and LIMITED_URL must be set (run run.sh)');
  process.exit(2);
}

// Every request the SDK makes, to count its own attempts.
const sent = [];
async function countingFetch(url, init) {
  sent.push(url);
  return fetch(url, init);
}
const sdk = new OpenAI({ baseURL: `${SERVE}/v1`, apiKey: 'not-a-provider-key', fetch: countingFetch });
const limited = new OpenAI({ baseURL: `${LIMITED}/v1`, apiKey: 'x', maxRetries: 0 });

let failed = 0;
let passed = 0;
async function check(name, fn) {
  try {
    const detail = await fn();
    passed++;
    console.log(`PASS ${name}${detail ? ` (${detail})` : ''}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e?.stack ?? e}`);
  }
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
const ask = (model, content = 'hello gateway') => ({
  model, messages: [{ role: 'user', content }], max_completion_tokens: 32,
});

await check('keel serve: upstream 429 then ok -> one 200 for the SDK (keel retried), text, usage, _request_id', async () => {
  const before = sent.length;
  const r = await sdk.chat.completions.create(ask('gw-primary'));
  eq(sent.length - before, 1, 'SDK attempts');
  eq(r.object, 'chat.completion', 'object');
  eq(r.choices[0].message.content, 'mock answer to: hello gateway', 'content');
  eq(r.choices[0].finish_reason, 'stop', 'finish_reason');
  eq(r.usage.total_tokens > 0, true, 'usage.total_tokens > 0');
  eq(typeof r._request_id, 'string', '_request_id');
  return `model ${r.model}, ${r._request_id}`;
});

await check('keel serve: upstream 503 x3 -> keel falls back; the SDK gets 200 from gw-backup', async () => {
  const before = sent.length;
  const r = await sdk.chat.completions.create(ask('gw-primary'));
  eq(sent.length - before, 1, 'SDK attempts');
  eq(r.model, 'gw-backup', 'model');
  return `model ${r.model}`;
});

await check('keel serve: an upstream content filter -> 200 with finish_reason "content_filter", as OpenAI answers it', async () => {
  const r = await limited.chat.completions.create(ask('gw-filtered'));
  eq(r.object, 'chat.completion', 'object');
  eq(r.choices[0].finish_reason, 'content_filter', 'finish_reason');
});

await check('keel serve: an upstream content filter in a stream -> the stream ends with finish_reason "content_filter", no error', async () => {
  const stream = await limited.chat.completions.create({ ...ask('gw-filtered'), stream: true });
  let finish = null;
  for await (const chunk of stream) {
    if (chunk.choices[0]?.finish_reason) finish = chunk.choices[0].finish_reason;
  }
  eq(finish, 'content_filter', 'finish_reason');
});

await check('keel serve: a model it does not serve -> NotFoundError 404 model_not_found, not retried', async () => {
  const before = sent.length;
  const e = await thrown(sdk.chat.completions.create(ask('gpt-unknown')));
  eq(e instanceof OpenAI.NotFoundError, true, `NotFoundError (got ${e?.constructor?.name})`);
  eq(e.status, 404, 'status');
  eq(e.code, 'model_not_found', 'code');
  eq(sent.length - before, 1, 'SDK attempts');
});

await check('keel serve: an audio content part -> BadRequestError 400 naming the part', async () => {
  const e = await thrown(sdk.chat.completions.create({
    model: 'gw-primary',
    messages: [{ role: 'user', content: [{ type: 'input_audio', input_audio: { data: 'AAAA', format: 'wav' } }] }],
  }));
  eq(e instanceof OpenAI.BadRequestError, true, `BadRequestError (got ${e?.constructor?.name})`);
  eq(e.param, 'messages[0].content[0].type', 'param');
});

// Tools (issue 18): the SDK's own tool loop through keel, to an OpenAI, an Anthropic and a
// Bedrock route.
const weatherTool = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'Current weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
};
const png = 'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==';

for (const model of ['gw-primary', 'gw-claude', 'anthropic.gw-bedrock']) {
  await check(`keel serve (${model}): tools -> message.tool_calls the SDK reads, finish_reason tool_calls`, async () => {
    const r = await sdk.chat.completions.create({ ...ask(model, 'weather in Paris?'), tools: [weatherTool] });
    const choice = r.choices[0];
    eq(choice.finish_reason, 'tool_calls', 'finish_reason');
    eq(choice.message.content, null, 'content');
    eq(choice.message.tool_calls?.length, 1, 'tool_calls');
    const call = choice.message.tool_calls[0];
    eq(call.type, 'function', 'type');
    eq(call.function.name, 'get_weather', 'name');
    eq(typeof JSON.parse(call.function.arguments).city, 'string', 'arguments.city');
    return `id ${call.id}`;
  });

  await check(`keel serve (${model}): runTools() loop -> the tool runs once, its result comes back, final text`, async () => {
    let calls = 0;
    const runner = sdk.chat.completions.runTools({
      ...ask(model, 'weather in Paris?'),
      tools: [{
        type: 'function',
        function: {
          name: 'get_weather',
          parameters: weatherTool.function.parameters,
          parse: JSON.parse,
          function: (args) => { calls++; eq(typeof args.city, 'string', 'parsed args.city'); return 'sunny 18C'; },
        },
      }],
    });
    const final = await runner.finalContent();
    eq(calls, 1, 'tool calls run');
    eq(final, 'mock answer to: tool result sunny 18C', 'final content');
    eq(runner.messages.length, 4, 'messages (user, assistant call, tool, assistant)');
  });

  await check(`keel serve (${model}): chat.completions.stream() with tools -> finalChatCompletion() assembles the call from deltas`, async () => {
    const runner = sdk.chat.completions.stream({ ...ask(model, 'weather?'), tools: [weatherTool] });
    let deltas = 0;
    runner.on('chunk', (c) => { if (c.choices[0]?.delta?.tool_calls) deltas++; });
    const final = await runner.finalChatCompletion();
    const call = final.choices[0].message.tool_calls?.[0];
    eq(final.choices[0].finish_reason, 'tool_calls', 'finish_reason');
    eq(call?.function?.name, 'get_weather', 'name');
    eq(typeof JSON.parse(call.function.arguments).city, 'string', 'arguments');
    eq(deltas > 1, true, `tool_calls deltas (${deltas})`);
    return `${deltas} tool_calls deltas`;
  });

  await check(`keel serve (${model}): an image_url part (data: URL) passes through -> 200`, async () => {
    const r = await sdk.chat.completions.create({
      model, max_completion_tokens: 32,
      messages: [{ role: 'user', content: [{ type: 'text', text: 'what is this?' }, { type: 'image_url', image_url: { url: png, detail: 'low' } }] }],
    });
    eq(r.choices[0].message.content, 'mock answer to: what is this?', 'content');
  });
}

await check('keel serve: stream: true + include_usage -> chunks reassemble the text, finish_reason stop, usage chunk', async () => {
  const stream = await sdk.chat.completions.create({
    ...ask('gw-primary', 'stream through keel'), stream: true, stream_options: { include_usage: true },
  });
  let text = '';
  let finish = null;
  let usage = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    eq(chunk.object, 'chat.completion.chunk', 'object');
    if (chunk.choices.length > 0) {
      text += chunk.choices[0].delta.content ?? '';
      finish = chunk.choices[0].finish_reason ?? finish;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  eq(text, 'mock answer to: stream through keel', 'text');
  eq(finish, 'stop', 'finish_reason');
  eq(usage?.total_tokens > 0, true, 'usage chunk');
  return `${chunks} chunks`;
});

await check('keel serve: chat.completions.stream() helper -> finalChatCompletion() has the text and stop', async () => {
  const runner = sdk.chat.completions.stream(ask('gw-primary', 'helper'));
  const final = await runner.finalChatCompletion();
  eq(final.choices[0].message.content, 'mock answer to: helper', 'content');
  eq(final.choices[0].finish_reason, 'stop', 'finish_reason');
});

await check('keel serve: models.list() names one route per config', async () => {
  const ids = [];
  for await (const m of sdk.models.list()) ids.push(m.id);
  eq(JSON.stringify(ids), '["gw-primary","gw-claude","anthropic.gw-bedrock"]', 'ids');
});

await check('keel serve: an Anthropic-backed route answers the OpenAI SDK as an OpenAI completion', async () => {
  const r = await sdk.chat.completions.create(ask('gw-claude', 'from claude'));
  eq(r.choices[0].message.content, 'mock answer to: from claude', 'content');
  eq(r.choices[0].finish_reason, 'stop', 'finish_reason (end_turn)');
  eq(r.usage.prompt_tokens > 0, true, 'usage');
  let text = '';
  for await (const chunk of await sdk.chat.completions.create({ ...ask('gw-claude', 'stream claude'), stream: true })) {
    text += chunk.choices[0]?.delta?.content ?? '';
  }
  eq(text, 'mock answer to: stream claude', 'streamed text');
});

// Structured output on every provider: OpenAI gets response_format as is; Anthropic and Bedrock
// get a tool the model must call, whose call keel gives back as the message's JSON content.
const orderSchema = {
  type: 'object',
  properties: { id: { type: 'string' }, tier: { type: 'string', enum: ['free', 'pro'] } },
  required: ['id', 'tier'],
  additionalProperties: false,
};
for (const model of ['gw-primary', 'gw-claude', 'anthropic.gw-bedrock']) {
  await check(`keel serve (${model}): chat.completions.parse() strict json_schema -> message.parsed`, async () => {
    const c = await sdk.chat.completions.parse({
      ...ask(model, 'an order'),
      response_format: { type: 'json_schema', json_schema: { name: 'order', strict: true, schema: orderSchema } },
    });
    const choice = c.choices[0];
    const parsed = choice.message.parsed;
    eq(choice.finish_reason, 'stop', 'finish_reason');
    eq(choice.message.tool_calls?.length ?? 0, 0, 'tool_calls');
    eq(typeof parsed?.id, 'string', 'parsed.id');
    eq(['free', 'pro'].includes(parsed?.tier), true, `parsed.tier ${parsed?.tier}`);
    return `parsed ${JSON.stringify(parsed)}`;
  });
}

await check('keel serve (gw-claude): a streamed json_schema answer -> finalChatCompletion() content is the JSON, finish_reason stop', async () => {
  const stream = sdk.chat.completions.stream({
    ...ask('gw-claude', 'an order'),
    response_format: { type: 'json_schema', json_schema: { name: 'order', strict: true, schema: orderSchema } },
  });
  const c = await stream.finalChatCompletion();
  // The helper parses the content only for a response_format made by its zod helper; the
  // content is the JSON either way.
  const parsed = c.choices[0].message.parsed ?? JSON.parse(c.choices[0].message.content);
  eq(c.choices[0].finish_reason, 'stop', 'finish_reason');
  eq(c.choices[0].message.tool_calls?.length ?? 0, 0, 'tool_calls');
  eq(['free', 'pro'].includes(parsed?.tier), true, `parsed.tier ${parsed?.tier}`);
  return `parsed ${JSON.stringify(parsed)}`;
});

await check('keel serve: upstream 429 (Retry-After 2 s) with no retry left -> RateLimitError 429, retry-after and retry-after-ms', async () => {
  const e = await thrown(limited.chat.completions.create(ask('gw-limited')));
  eq(e instanceof OpenAI.RateLimitError, true, `RateLimitError (got ${e?.constructor?.name})`);
  eq(e.status, 429, 'status');
  eq(e.code, 'rate_limit_exceeded', 'code');
  eq(e.headers.get('retry-after'), '2', 'retry-after');
  eq(e.headers.get('retry-after-ms'), '2000', 'retry-after-ms');
  return e.message.slice(0, 120);
});

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
