#!/usr/bin/env node
// Publishes messages to a topic, one Publish call each or in BatchPublish
// calls, with attributes, a deadline per call, and a W3C `traceparent` header.
//
//   node publish.js --topic orders --count 10 --attr source=example
//   node publish.js --topic orders --count 1000 --batch 100
//
// Message i (from 1) has the payload "<prefix><i>". Prints "SEQUENCE
// MESSAGE_ID" per stored message, in order.
//
// Every call carries a `traceparent` metadata header: one trace for the whole
// run, a new span id per call. Sluice makes its `sluice.publish` span a child
// of it (when it exports traces) and stores the message with a `traceparent`
// attribute, so consumers can continue the trace.
//
// A call that fails is not retried here: a publish that timed out may still
// have been stored, and retrying it could store the message twice.

import { parseArgs } from 'node:util';

import { connect, DEFAULT_ADDR, DEFAULT_PROTO, grpc, newTraceId, statusName, traceparent, unary } from './lib/sluice.js';

function options() {
  const { values: v } = parseArgs({
    options: {
      addr: { type: 'string', default: DEFAULT_ADDR },
      proto: { type: 'string', default: DEFAULT_PROTO },
      topic: { type: 'string' },
      count: { type: 'string', default: '1' },
      prefix: { type: 'string', default: 'message-' },
      attr: { type: 'string', multiple: true, default: [] },
      batch: { type: 'string', default: '0' },
      timeout: { type: 'string', default: '5' },
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
  if (!Number.isInteger(count) || count < 0) fail('--count wants an integer >= 0');
  if (!Number.isInteger(batch) || batch < 0) fail('--batch wants an integer >= 0');
  if (!(timeout > 0)) fail('--timeout wants seconds > 0');
  return { ...v, attributes, count, batch, timeoutMs: timeout * 1000 };
}

const opts = options();
const client = connect(opts.addr, opts.proto);
const traceId = newTraceId();
console.error(`publish: trace id ${traceId}`);
const payloads = Array.from({ length: opts.count }, (_, i) => Buffer.from(`${opts.prefix}${i + 1}`));

// Metadata for one call: its own span in the run's trace.
function callMetadata() {
  const md = new grpc.Metadata();
  md.set('traceparent', traceparent(traceId));
  return { metadata: md, timeoutMs: opts.timeoutMs };
}

try {
  if (opts.batch === 0) {
    for (const payload of payloads) {
      const r = await unary(client, 'publish', { topic: opts.topic, payload, attributes: opts.attributes }, callMetadata());
      console.log(`${r.sequence} ${r.messageId}`);
    }
  } else {
    for (let start = 0; start < payloads.length; start += opts.batch) {
      const messages = payloads.slice(start, start + opts.batch).map((payload) => ({ payload, attributes: opts.attributes }));
      const r = await unary(client, 'batchPublish', { topic: opts.topic, messages }, callMetadata());
      // One result per message, in order.
      for (const res of r.results) console.log(`${res.sequence} ${res.messageId}`);
    }
  }
  console.error(`publish: ${payloads.length} messages to ${opts.topic}`);
} catch (err) {
  if (err.code === undefined) throw err;
  const hint = err.code === grpc.status.DEADLINE_EXCEEDED ? ' (the broker may still have stored it)' : '';
  console.error(`publish: ${statusName(err.code)}: ${err.details}${hint}`);
  process.exitCode = 1;
} finally {
  client.close();
}
