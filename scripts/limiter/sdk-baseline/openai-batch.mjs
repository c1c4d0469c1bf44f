#!/usr/bin/env node
// The official OpenAI Node SDK as a plain client: its own retry loop (maxRetries, Retry-After,
// exponential backoff 0.5 s .. 8 s with up to 25% jitter), nothing else. A reference point for
// keel against scripts/limiter/nginx-limiter.sh.
//
// Usage:
//   node openai-batch.mjs --base-url http://127.0.0.1:P/v1 (--in prompts.jsonl | --prompts N)
//                         [--concurrency 64] [--max-retries K] [--model gpt-4o-mini]
//                         [--api-key sk-test] [--timeout-s S] [--out results.jsonl]
//
//   --in FILE        keel's batch input: one {"id": ..., "prompt": "..."} per line
//                    ("messages" instead of "prompt", and "model", are honoured too)
//   --prompts N      generate N prompts instead ({"id": i, "prompt": "Prompt i: ..."}, i = 1..N)
//   --concurrency C  items in flight at once (default 64); each is one chat.completions.create
//   --max-retries K  the SDK's maxRetries (default: the SDK's own default, 2)
//   --timeout-s S    the SDK's per-attempt timeout (default: the SDK's own, 600 s)
//   --out FILE       also write one JSON record per item (id, status, http_status, latency_s)
//
// Prints one JSON summary line on stdout: client, prompts, ok, failed, wall_s, attempts (every
// HTTP request, counted by wrapping fetch via the SDK's `fetch` option), http_429, p50_s, p99_s
// (nearest rank over every item's latency, retries included, as keel's summary does),
// failed_by_status, http_status (every response's status). Only 127.0.0.1 / localhost / ::1
// base URLs are accepted: this never talks to a real provider.
import fs from 'node:fs';
import readline from 'node:readline';
import OpenAI from 'openai';
import { VERSION as SDK_VERSION } from 'openai/version';

function usage(msg) {
  if (msg) {
    process.stderr.write(`openai-batch.mjs: ${msg} (see --help)\n`);
    process.exit(2);
  }
  const text = fs.readFileSync(new URL(import.meta.url), 'utf8').split('\n');
  const end = text.findIndex((l) => l.startsWith('import '));
  process.stdout.write(text.slice(1, end).map((l) => l.replace(/^\/\/ ?/, '')).join('\n') + '\n');
  process.exit(0);
}

function parseArgs(argv) {
  const o = { concurrency: 64, model: 'gpt-4o-mini', apiKey: 'sk-test' };
  const need = (i) => {
    if (i + 1 >= argv.length) usage(`${argv[i]} needs a value`);
    return argv[i + 1];
  };
  const int = (flag, v, min) => {
    if (!/^\d+$/.test(v) || Number(v) < min) usage(`${flag}: expected an integer >= ${min}, got '${v}'`);
    return Number(v);
  };
  for (let i = 0; i < argv.length; i += 2) {
    const a = argv[i];
    switch (a) {
      case '--base-url': o.baseURL = need(i); break;
      case '--in': o.in = need(i); break;
      case '--prompts': o.prompts = int(a, need(i), 1); break;
      case '--concurrency': o.concurrency = int(a, need(i), 1); break;
      case '--max-retries': o.maxRetries = int(a, need(i), 0); break;
      case '--timeout-s': {
        const v = Number(need(i));
        if (!(v > 0)) usage(`--timeout-s: expected a number > 0, got '${argv[i + 1]}'`);
        o.timeoutMs = Math.round(v * 1000);
        break;
      }
      case '--model': o.model = need(i); break;
      case '--api-key': o.apiKey = need(i); break;
      case '--out': o.out = need(i); break;
      case '-h': case '--help': usage(); break;
      default: usage(`unknown option '${a}'`);
    }
  }
  if (!o.baseURL) usage('--base-url is required (e.g. http://127.0.0.1:8080/v1)');
  let u;
  try { u = new URL(o.baseURL); } catch { usage(`--base-url: not a URL: '${o.baseURL}'`); }
  if (!['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname)) {
    usage(`--base-url: only loopback hosts are allowed, got '${u.hostname}'`);
  }
  if ((o.in === undefined) === (o.prompts === undefined)) usage('give exactly one of --in FILE and --prompts N');
  return o;
}

async function loadItems(o) {
  if (o.prompts !== undefined) {
    return Array.from({ length: o.prompts }, (_, k) => ({
      id: k + 1,
      prompt: `Prompt ${k + 1}: summarise the incident report in two sentences.`,
    }));
  }
  const items = [];
  const rl = readline.createInterface({ input: fs.createReadStream(o.in), crlfDelay: Infinity });
  let line = 0;
  for await (const text of rl) {
    line++;
    if (!text.trim()) continue;
    let j;
    try { j = JSON.parse(text); } catch (e) { usage(`${o.in}:${line}: not JSON: ${e.message}`); }
    if (typeof j.prompt !== 'string' && !Array.isArray(j.messages)) {
      usage(`${o.in}:${line}: needs "prompt" (a string) or "messages" (an array)`);
    }
    items.push(j);
  }
  return items;
}

function percentile(values, p) {  // nearest rank, like keel's summary
  if (!values.length) return 0;
  const v = [...values].sort((a, b) => a - b);
  const rank = Math.min(Math.max(Math.ceil((p / 100) * v.length), 1), v.length);
  return v[rank - 1];
}

const r3 = (x) => Math.round(x * 1000) / 1000;

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const items = await loadItems(o);

  let attempts = 0;
  let connectionErrors = 0;
  const httpStatus = {};
  const countingFetch = async (url, init) => {
    attempts++;
    try {
      const res = await fetch(url, init);
      httpStatus[res.status] = (httpStatus[res.status] ?? 0) + 1;
      return res;
    } catch (e) {
      connectionErrors++;
      throw e;
    }
  };
  const client = new OpenAI({
    baseURL: o.baseURL,
    apiKey: o.apiKey,
    fetch: countingFetch,
    ...(o.maxRetries !== undefined ? { maxRetries: o.maxRetries } : {}),
    ...(o.timeoutMs !== undefined ? { timeout: o.timeoutMs } : {}),
  });

  const out = o.out ? fs.createWriteStream(o.out) : null;
  const latencies = [];
  const failedByStatus = {};
  let ok = 0;
  let failed = 0;
  let next = 0;
  const t0 = performance.now();

  async function worker() {
    while (next < items.length) {
      const item = items[next++];
      const messages = item.messages ?? [{ role: 'user', content: item.prompt }];
      const start = performance.now();
      let rec;
      try {
        const r = await client.chat.completions.create({ model: item.model ?? o.model, messages });
        ok++;
        rec = { id: item.id, status: 'ok', http_status: 200, finish_reason: r.choices?.[0]?.finish_reason };
      } catch (e) {
        failed++;
        const key = e instanceof OpenAI.APIError && e.status ? String(e.status)
          : e instanceof OpenAI.APIConnectionTimeoutError ? 'timeout'
          : e instanceof OpenAI.APIConnectionError ? 'connection'
          : (e?.name ?? 'error');
        failedByStatus[key] = (failedByStatus[key] ?? 0) + 1;
        rec = { id: item.id, status: 'failed', http_status: e?.status ?? null, error: String(e?.message ?? e).slice(0, 200) };
      }
      const s = (performance.now() - start) / 1000;
      latencies.push(s);
      if (out) out.write(JSON.stringify({ ...rec, latency_s: r3(s) }) + '\n');
    }
  }

  await Promise.all(Array.from({ length: Math.min(o.concurrency, items.length) }, worker));
  const wall = (performance.now() - t0) / 1000;
  if (out) await new Promise((res) => out.end(res));

  const summary = {
    client: `openai-node ${SDK_VERSION}`,
    node: process.version,
    base_url: o.baseURL,
    concurrency: o.concurrency,
    max_retries: client.maxRetries,
    prompts: items.length,
    ok,
    failed,
    wall_s: r3(wall),
    attempts,
    http_429: httpStatus[429] ?? 0,
    p50_s: r3(percentile(latencies, 50)),
    p99_s: r3(percentile(latencies, 99)),
    failed_by_status: failedByStatus,
    http_status: httpStatus,
    connection_errors: connectionErrors,
  };
  process.stdout.write(JSON.stringify(summary) + '\n');
  process.exitCode = failed ? 1 : 0;
}

main().catch((e) => {
  process.stderr.write(`openai-batch.mjs: ${e?.stack ?? e}\n`);
  process.exit(2);
});
