// Checks of the consumer's bookkeeping and the publisher's retries (no broker
// needed): npm test.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { AckTracker, Backoff, CreditWindow, retry, RETRY_CODES } from '../lib/flow.js';

test('the credit window is topped up in grants of half the window, never stalling', () => {
  const w = new CreditWindow(8);
  assert.equal(w.openingGrant(), 8);
  assert.deepEqual(Array.from({ length: 8 }, () => w.handled()), [0, 0, 0, 4, 0, 0, 0, 4]);
  // Credit not yet spent stays within 1..8 however many are handled.
  let [granted, handled] = [16, 8];
  for (let i = 0; i < 100; i++) {
    handled += 1;
    granted += w.handled();
    assert.ok(granted - handled >= 1 && granted - handled <= 8, `${granted - handled} unspent`);
  }
  const one = new CreditWindow(1);
  assert.equal(one.openingGrant(), 1);
  assert.deepEqual([one.handled(), one.handled()], [1, 1]);
  w.handled();
  assert.equal(w.openingGrant(), 8, 'a new stream starts with the whole window');
  assert.throws(() => new CreditWindow(0), RangeError);
});

test('acks never pass a message that failed and was nacked', () => {
  const t = new AckTracker();
  t.started(1n, 'a');
  t.finish(1n, 'a');
  t.started(2n, 'b'); // fails: nacked, stays unfinished
  for (const s of [3n, 4n]) {
    t.started(s, String(s));
    t.finish(s, String(s));
  }
  let taken = t.takeAckable();
  assert.deepEqual(taken, [[1n, 'a']]);
  t.acked(taken);
  assert.deepEqual(t.takeAckable(), [], '3 and 4 wait for 2');
  assert.equal(t.isDuplicate(2n), false, 'its redelivery is processed');
  t.finish(2n, 'b');
  taken = t.takeAckable();
  assert.deepEqual(taken.map(([s]) => s), [2n, 3n, 4n]);
  t.acked(taken);
  assert.equal(t.ackedUpTo, 4n);
  assert.equal(t.pendingAcks(), 0);
});

test('after a reconnect, duplicates are recognised and acked only in order', () => {
  const t = new AckTracker();
  for (const s of [1n, 2n, 3n]) t.started(s, String(s));
  t.finish(1n, '1');
  t.acked(t.takeAckable());
  t.finish(3n, '3'); // 2 failed; 3 is finished but cannot be acked yet
  t.newStream(); // the broker delivers 2 and 3 again
  assert.deepEqual(t.takeAckable(), []);
  assert.equal(t.isDuplicate(1n), true);
  assert.equal(t.isDuplicate(2n), false);
  assert.equal(t.isDuplicate(3n), true);
  t.started(2n, '2');
  t.finish(2n, '2');
  t.finish(3n, '3'); // the duplicate, handled without processing
  const taken = t.takeAckable();
  assert.deepEqual(taken.map(([s]) => s), [2n, 3n]);
  t.acked(taken);
  assert.equal(t.doneEarlier.size, 0);
});

test('sequences compare as numbers, not as text', () => {
  const t = new AckTracker();
  for (const s of [9n, 10n, 100n]) {
    t.started(s, String(s));
    t.finish(s, String(s));
  }
  assert.deepEqual(t.takeAckable().map(([s]) => s), [9n, 10n, 100n]);
  t.started(2n ** 63n, 'big');
  t.finish(2n ** 63n, 'big');
  t.acked(t.takeAckable());
  assert.equal(t.ackedUpTo, 2n ** 63n);
});

test('backoff doubles up to the cap, with jitter in the upper half', () => {
  const low = new Backoff({ baseMs: 100, capMs: 2000, random: () => 0 });
  const high = new Backoff({ baseMs: 100, capMs: 2000, random: () => 0.999999 });
  const lows = Array.from({ length: 8 }, () => Math.round(low.nextDelayMs()));
  const highs = Array.from({ length: 8 }, () => Math.round(high.nextDelayMs()));
  assert.deepEqual(lows, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
  assert.deepEqual(highs, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
  low.reset();
  assert.equal(Math.round(low.nextDelayMs()), 50);
});

// retry() over a call that rejects with { code } or resolves with each of
// `outcomes` in turn: [result or error, calls made, delays slept].
async function runRetry(outcomes, attempts = 5) {
  let calls = 0;
  const slept = [];
  const told = [];
  const backoff = new Backoff({ baseMs: 100, capMs: 400, random: () => 0.999999 });
  backoff.nextDelayMs(); // left over from an earlier call: retry() starts afresh
  const call = async () => {
    const o = outcomes[calls++];
    if (o instanceof Error) throw o;
    return o;
  };
  let result;
  try {
    result = await retry(call, {
      codeOf: (err) => err.code,
      backoff,
      attempts,
      onRetry: (err, code, attempt) => told.push([code, attempt]),
      sleep: async (ms) => slept.push(Math.round(ms)),
    });
  } catch (err) {
    result = err;
  }
  assert.equal(told.length, slept.length);
  return [result, calls, slept];
}

const failed = (code) => Object.assign(new Error(code), { code });

test('publishes are retried only when the outcome is unknown', async () => {
  assert.deepEqual([...RETRY_CODES].sort(), ['DEADLINE_EXCEEDED', 'UNAVAILABLE']);
  assert.deepEqual(
    await runRetry([failed('UNAVAILABLE'), failed('DEADLINE_EXCEEDED'), failed('UNAVAILABLE'), 'ok']),
    ['ok', 4, [100, 200, 400]],
  );
  for (const answer of ['INVALID_ARGUMENT', 'NOT_FOUND', 'RESOURCE_EXHAUSTED', 'INTERNAL']) {
    const [err, calls, slept] = await runRetry([failed(answer), 'ok']);
    assert.deepEqual([err.code, calls, slept], [answer, 1, []]);
  }
  const [err, calls] = await runRetry([new TypeError('not gRPC'), 'ok']);
  assert.deepEqual([err.message, calls], ['not gRPC', 1], 'thrown at once');
});

test('a publish retry gives up after the last attempt, with capped delays', async () => {
  const [err, calls, slept] = await runRetry(Array(6).fill(failed('UNAVAILABLE')), 6);
  assert.deepEqual([err.code, calls, slept], ['UNAVAILABLE', 6, [100, 200, 400, 400, 400]]);
});
