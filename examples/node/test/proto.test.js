// Checks that proto/ loads the way the examples use it (no broker needed):
// the methods and their streaming kinds, and how messages map to JavaScript.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { loadSluice, newTraceId, traceparent } from '../lib/sluice.js';

const { Sluice } = loadSluice();
const methods = Sluice.service;

test('the service has the methods the examples call, with their streaming kinds', () => {
  for (const name of ['Publish', 'BatchPublish', 'ListTopics', 'GetTopicStats', 'DeleteTopic', 'ResetCursor']) {
    assert.equal(methods[name].requestStream, false, name);
    assert.equal(methods[name].responseStream, false, name);
  }
  assert.equal(methods.Subscribe.path, '/sluice.v1.Sluice/Subscribe');
  assert.equal(methods.Subscribe.requestStream, true);
  assert.equal(methods.Subscribe.responseStream, true);
  for (const name of ['publish', 'batchPublish', 'getTopicStats', 'subscribe']) {
    assert.equal(typeof Sluice.prototype[name], 'function', name);
  }
});

test('upstream messages encode from plain objects, oneof by field name', () => {
  const { requestSerialize, requestDeserialize } = methods.Subscribe;
  const init = { init: { topic: 'orders', consumerGroup: 'billing', initialPosition: 'EARLIEST' } };
  const back = requestDeserialize(requestSerialize(init));
  assert.equal(back.request, 'init');
  assert.equal(back.init.consumerGroup, 'billing');
  assert.equal(back.init.initialPosition, 'EARLIEST');
  const acks = requestDeserialize(requestSerialize({ batchAck: { messageIds: ['a', 'b'] } }));
  assert.equal(acks.request, 'batchAck');
  assert.deepEqual(acks.batchAck.messageIds, ['a', 'b']);
  const nack = requestDeserialize(requestSerialize({ nack: { messageId: 'a', redeliveryDelayMs: 500 } }));
  assert.equal(nack.nack.redeliveryDelayMs, 500);
});

test('idempotency keys encode, and duplicate flags decode, per message', () => {
  const one = methods.Publish.requestDeserialize(
    methods.Publish.requestSerialize({ topic: 't', payload: Buffer.from('x'), idempotencyKey: 'run-1/1' }),
  );
  assert.equal(one.idempotencyKey, 'run-1/1');
  const batch = methods.BatchPublish.requestDeserialize(
    methods.BatchPublish.requestSerialize({
      topic: 't',
      messages: [{ payload: Buffer.from('a'), idempotencyKey: 'k/1' }, { payload: Buffer.from('b'), idempotencyKey: 'k/2' }],
    }),
  );
  assert.deepEqual(batch.messages.map((m) => m.idempotencyKey), ['k/1', 'k/2']);
  const reply = methods.Publish.responseDeserialize(
    methods.Publish.responseSerialize({ messageId: 'id', sequence: '7', duplicate: true }),
  );
  assert.deepEqual([reply.sequence, reply.duplicate], ['7', true]);
  const results = methods.BatchPublish.responseDeserialize(
    methods.BatchPublish.responseSerialize({ results: [{ sequence: '1', duplicate: true }, { sequence: '2' }] }),
  ).results;
  assert.deepEqual(results.map((r) => r.duplicate), [true, false], 'defaults: false when unset');
});

test('a delivery decodes with uint64 sequences as exact decimal strings and bytes as Buffer', () => {
  const { responseSerialize, responseDeserialize } = methods.Subscribe;
  const wire = responseSerialize({
    delivery: {
      messageId: 'id',
      sequence: '18446744073709551615',
      payload: Buffer.from([0xff, 0x00]),
      attributes: { traceparent: 'x' },
      deliveryCount: 2,
    },
  });
  const down = responseDeserialize(wire);
  assert.equal(down.response, 'delivery');
  assert.equal(down.delivery.sequence, '18446744073709551615');
  assert.ok(Buffer.isBuffer(down.delivery.payload));
  assert.deepEqual([...down.delivery.payload], [0xff, 0x00]);
  assert.equal(down.delivery.attributes.traceparent, 'x');
  assert.equal(down.delivery.deliveryCount, 2);
});

test('traceparent values are W3C version 00, sampled, one trace with new spans', () => {
  const trace = newTraceId();
  const [a, b] = [traceparent(trace), traceparent(trace)];
  for (const tp of [a, b]) {
    assert.match(tp, /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/);
    assert.equal(tp.split('-')[1], trace);
  }
  assert.notEqual(a.split('-')[2], b.split('-')[2]);
});
