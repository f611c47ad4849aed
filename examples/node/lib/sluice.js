// What the three examples share: the sluice.v1 client, loaded from proto/ at
// start-up (no generated code to go stale), unary calls as promises with a
// deadline, and W3C traceparent values.

import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

export { grpc };

const here = path.dirname(fileURLToPath(import.meta.url));
export const DEFAULT_PROTO = process.env.SLUICE_PROTO ?? path.resolve(here, '..', '..', '..', 'proto');
export const DEFAULT_ADDR = process.env.SLUICE_ADDR ?? '127.0.0.1:50051';

// Long-lived streams want keepalive (the broker answers a ping every 10 s or
// more often), and the channel's own reconnect attempts should not wait longer
// than our backoff does.
export const CHANNEL_OPTIONS = {
  'grpc.keepalive_time_ms': 20_000,
  'grpc.keepalive_timeout_ms': 10_000,
  'grpc.initial_reconnect_backoff_ms': 100,
  'grpc.max_reconnect_backoff_ms': 5_000,
};

// How proto-loader maps sluice.proto to JavaScript: field names in camelCase
// (messageId, deliveryCount), uint64 sequences as decimal strings (they can
// exceed 2^53), enums by name, bytes as Buffer, and for each oneof a property
// naming the field that is set (`response: 'delivery'`).
export const LOADER_OPTIONS = {
  keepCase: false,
  longs: String,
  enums: String,
  bytes: Buffer,
  defaults: true,
  oneofs: true,
};

/** The sluice.v1 package object: `.Sluice` is the client constructor. */
export function loadSluice(protoDir = DEFAULT_PROTO) {
  const file = path.join(protoDir, 'sluice', 'v1', 'sluice.proto');
  const definition = protoLoader.loadSync(file, { ...LOADER_OPTIONS, includeDirs: [protoDir] });
  return grpc.loadPackageDefinition(definition).sluice.v1;
}

/** A client for the Sluice service at `addr` (HOST:PORT, plaintext). */
export function connect(addr = DEFAULT_ADDR, protoDir = DEFAULT_PROTO) {
  const { Sluice } = loadSluice(protoDir);
  return new Sluice(addr, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
}

/** Calls a unary method; resolves with the response or rejects with the
 * gRPC error (`err.code` is a `grpc.status`, `err.details` the message). */
export function unary(client, method, request, { metadata = new grpc.Metadata(), timeoutMs = 5000 } = {}) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + timeoutMs }, (err, response) =>
      err ? reject(err) : resolve(response));
  });
}

function nonZeroHex(bytes) {
  for (;;) {
    const hex = randomBytes(bytes).toString('hex');
    if (/[^0]/.test(hex)) return hex;
  }
}

/** 32 hex digits, not all zero (W3C Trace Context). */
export function newTraceId() {
  return nonZeroHex(16);
}

/** A W3C `traceparent` for a new span (random span id) in the trace
 * `traceId`, sampled: version 00, flags 01. */
export function traceparent(traceId) {
  return `00-${traceId}-${nonZeroHex(8)}-01`;
}

/** The name of a grpc.status code, e.g. UNAVAILABLE. */
export function statusName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) ?? String(code);
}
