#!/usr/bin/env node
// Publishes messages to a topic exactly once, one Publish call each or in
// BatchPublish calls, with attributes, a deadline per call, and a W3C
// `traceparent` header.
//
//   node publish.js --topic orders --count 10 --attr source=example
//   node publish.js --topic orders --count 1000 --batch 100
//   node publish.js --topic orders --count 10 --key-prefix orders-2024-06-01/
//
// Message i (from 1) has the payload "<prefix><i>" and the idempotency key
// "<key-prefix><i>": its identity in the application, the same in every call
// that carries it. Prints "SEQUENCE MESSAGE_ID" per message, in order, with
// " duplicate" added when the broker already had that key (the ids are the
// stored message's).
//
// A call that fails with UNAVAILABLE or DEADLINE_EXCEEDED may or may not have
// been stored. It is sent again, with the same keys, after a capped
// exponential backoff with jitter (--attempts, --max-backoff): a message the
// lost attempt did store comes back as a duplicate instead of being stored
// twice. The broker remembers keys for its dedup window (default 2 min), so
// running the program again with the same --key-prefix within it publishes
// only what is missing. Without keys, a retry could store a message twice.
//
// Every call carries a `traceparent` metadata header: one trace for the whole
// run, a new span id per call. Sluice makes its `sluice.publish` span a child
// of it (when it exports traces) and stores the message with a `traceparent`
// attribute, so consumers can continue the trace.

import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';

import { Backoff, retry, RETRY_CODES } from './lib/flow.js';
import { connect, DEFAULT_ADDR, DEFAULT_PROTO, grpc, newTraceId, statusName, traceparent, unary } from './lib/sluice.js';

function options() {
  const { values: v } = parseArgs({
    options: {
      addr: { type: 'string', default: DEFAULT_ADDR },
      proto: { type: 'string', default: DEFAULT_PROTO },
      topic: { type: 'string' },
      count: { type: 'string', default: '1' },
      prefix: { type: 'string', default: 'message-' },
      // Default: a new run id.
      'key-prefix': { type: 'string', default: `run-${randomBytes(8).toString('hex')}/` },
      attr: { type: 'string', multiple: true, default: [] },
      batch: { type: 'string', default: '0' },
      timeout: { type: 'string', default: '5' },
      attempts: { type: 'string', default: '10' },
      'max-backoff': { type: 'string', default: '5' },
    },
  });
  const fail = (text) => {
    console.error(`publish: ${text}`);
    process.exit(2);
  };
  if (!v.topic) fail('--topic is required');
  const attributes = {};
  for (const kv of v.attr) {
    const i = kv.indexOf('=');
    if (i < 1) fail(`--attr wants K=V, got ${kv}`);
    attributes[kv.slice(0, i)] = kv.slice(i + 1);
  }
  const count = Number(v.count);
  const batch = Number(v.batch);
  const timeout = Number(v.timeout);
  const attempts = Number(v.attempts);
  const maxBackoff = Number(v['max-backoff']);
  const keyPrefix = v['key-prefix'];
  if (!Number.isInteger(count) || count < 0) fail('--count wants an integer >= 0');
  if (!Number.isInteger(batch) || batch < 0) fail('--batch wants an integer >= 0');
  if (!(timeout > 0)) fail('--timeout wants seconds > 0');
  if (!Number.isInteger(attempts) || attempts < 1) fail('--attempts wants an integer >= 1');
  if (!(maxBackoff > 0)) fail('--max-backoff wants seconds > 0');
  // Keys are 1 to 128 printable ASCII bytes.
  if (!/^[\x20-\x7e]*$/.test(keyPrefix) || keyPrefix.length + String(count).length > 128) {
    fail('--key-prefix wants printable ASCII, at most 128 bytes with the number');
  }
  return { ...v, attributes, count, batch, attempts, keyPrefix, timeoutMs: timeout * 1000, maxBackoffMs: maxBackoff * 1000 };
}

const opts = options();
const client = connect(opts.addr, opts.proto);
const traceId = newTraceId();
const log = (text) => console.error(`publish: ${text}`);
log(`trace id ${traceId}`);
log(`idempotency keys ${opts.keyPrefix}1 to ${opts.keyPrefix}${opts.count}`);
const messages = Array.from({ length: opts.count }, (_, i) => ({
  payload: Buffer.from(`${opts.prefix}${i + 1}`),
  attributes: opts.attributes,
  idempotencyKey: `${opts.keyPrefix}${i + 1}`,
}));
const backoff = new Backoff({ baseMs: 100, capMs: opts.maxBackoffMs });
let duplicates = 0;

// Calls `method` until it answers, retrying with the same request (the same
// keys) while the outcome is unknown. Each attempt is a call of its own: a
// new deadline and a new span in the run's trace.
function send(method, request) {
  return retry(
    () => {
      const metadata = new grpc.Metadata();
      metadata.set('traceparent', traceparent(traceId));
      return unary(client, method, request, { metadata, timeoutMs: opts.timeoutMs });
    },
    {
      codeOf: (err) => (err.code === undefined ? undefined : statusName(err.code)),
      backoff,
      attempts: opts.attempts,
      onRetry: (err, code, attempt, delay) =>
        log(`${code}: ${err.details}; retrying in ${(delay / 1000).toFixed(2)} s (attempt ${attempt + 1} of ${opts.attempts}, same keys)`),
    },
  );
}

function show(r) {
  if (r.duplicate) duplicates += 1;
  console.log(`${r.sequence} ${r.messageId}${r.duplicate ? ' duplicate' : ''}`);
}

try {
  if (opts.batch === 0) {
    for (const m of messages) show(await send('publish', { topic: opts.topic, ...m }));
  } else {
    for (let start = 0; start < messages.length; start += opts.batch) {
      const r = await send('batchPublish', { topic: opts.topic, messages: messages.slice(start, start + opts.batch) });
      // One result per message, in order.
      for (const res of r.results) show(res);
    }
  }
  log(`${messages.length} messages to ${opts.topic}: ${messages.length - duplicates} stored, ${duplicates} duplicates (stored before)`);
} catch (err) {
  if (err.code === undefined) throw err;
  log(`${statusName(err.code)}: ${err.details}`);
  if (RETRY_CODES.has(statusName(err.code))) {
    log(`giving up: the last call may or may not have stored its messages; run again with --key-prefix ${opts.keyPrefix} to publish what is missing, once`);
  }
  process.exitCode = 1;
} finally {
  client.close();
}
