// The consumer's bookkeeping (credit window, safe acks, backoff) and the
// publisher's retry loop. Plain JavaScript without gRPC; test/flow.test.js
// checks it.

import { setTimeout as sleepMs } from 'node:timers/promises';

/**
 * Keeps about `window` deliveries in flight. A stream starts with no credit:
 * grant the whole window first, then give back the credit each handled
 * delivery spent (a success, a failure that was nacked, or a duplicate), in
 * grants of at least half the window so that a fast stream does not send one
 * CreditGrant per message. Granting only once is the classic mistake: the
 * stream stalls after `window` messages.
 */
export class CreditWindow {
  constructor(window) {
    if (!(window >= 1)) throw new RangeError('the credit window must be at least 1');
    this.window = window;
    this.owed = 0;
  }

  /** The grant for a new stream (each stream starts at zero credit). */
  openingGrant() {
    this.owed = 0;
    return this.window;
  }

  /** One delivery was handled; returns the credit to grant now (0: not yet). */
  handled() {
    this.owed += 1;
    if (this.owed >= Math.max(1, Math.floor(this.window / 2))) {
      const grant = this.owed;
      this.owed = 0;
      return grant;
    }
    return 0;
  }
}

const bySequence = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

/**
 * Which acks are safe to send. Sluice's acks are cumulative: acking a message
 * moves the group's cursor to its sequence and so acknowledges every earlier
 * message too (a BatchAck moves it to the highest of its ids). So a consumer
 * may ack a message only when every message delivered before it is finished;
 * a message that failed and was nacked holds the acks behind it back until its
 * redelivery succeeds (acking past it would cancel the redelivery).
 *
 * It also recognises duplicates: delivery is at-least-once, so after a
 * reconnect the broker delivers again what was not yet acknowledged (and,
 * after a broker crash, possibly a few acks it had not written yet). It
 * remembers only what is not acked yet. Sequences are BigInts.
 */
export class AckTracker {
  constructor() {
    this.unfinished = new Map(); // sequence -> id: delivered on this stream, not finished
    this.finished = new Map(); // sequence -> id: finished on this stream, not acked
    this.doneEarlier = new Set(); // finished on an earlier stream, never acked
    this.ackedUpTo = 0n;
  }

  /** A new stream starts after the group's cursor and delivers again all
   * that is not acked. What an earlier stream finished but could not ack is a
   * duplicate when it comes again, and may be acked only once it has. */
  newStream() {
    for (const seq of this.finished.keys()) this.doneEarlier.add(seq);
    this.finished.clear();
    this.unfinished.clear();
  }

  isDuplicate(seq) {
    return seq <= this.ackedUpTo || this.finished.has(seq) || this.doneEarlier.has(seq);
  }

  started(seq, id) {
    this.unfinished.set(seq, id);
  }

  /** Processed, or recognised as a duplicate: may be acked. */
  finish(seq, id) {
    this.unfinished.delete(seq);
    this.doneEarlier.delete(seq);
    if (seq > this.ackedUpTo) this.finished.set(seq, id);
  }

  pendingAcks() {
    return this.finished.size;
  }

  /** [sequence, id] pairs that can be acked now, in sequence order: finished
   * and below every unfinished message. Call `acked` once they were sent. */
  takeAckable() {
    const floor = this.unfinished.size ? [...this.unfinished.keys()].sort(bySequence)[0] : null;
    return [...this.finished.entries()]
      .filter(([seq]) => floor === null || seq < floor)
      .sort(([a], [b]) => bySequence(a, b));
  }

  acked(taken) {
    for (const [seq] of taken) {
      this.finished.delete(seq);
      if (seq > this.ackedUpTo) this.ackedUpTo = seq;
    }
    for (const seq of this.doneEarlier) if (seq <= this.ackedUpTo) this.doneEarlier.delete(seq);
  }
}

/**
 * Capped exponential backoff with jitter: base, 2*base, 4*base, ... up to cap
 * (milliseconds), each delay drawn from [d/2, d] so that consumers restarted
 * by one outage do not all come back at the same instant.
 */
export class Backoff {
  constructor({ baseMs = 100, capMs = 5000, random = Math.random } = {}) {
    Object.assign(this, { baseMs, capMs, random });
    this.attempt = 0;
  }

  nextDelayMs() {
    const d = Math.min(this.capMs, this.baseMs * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 32);
    return d / 2 + (this.random() * d) / 2;
  }

  reset() {
    this.attempt = 0;
  }
}

/**
 * A call that failed with one of these (status names) may or may not have
 * been carried out: the broker was unreachable or the deadline passed before
 * the reply came. Retrying is safe only when the retry cannot store a message
 * twice, which is what idempotency keys are for. Any other code is an answer:
 * retrying cannot change it.
 */
export const RETRY_CODES = new Set(['UNAVAILABLE', 'DEADLINE_EXCEEDED']);

/**
 * Resolves with `await call()`, calling it again after a backoff delay while
 * it rejects with an error whose status name (`codeOf(err)`; undefined: not a
 * gRPC error) is in RETRY_CODES, at most `attempts` times in all; then
 * rejects with the last error. `onRetry(err, code, attempt, delayMs)` is told
 * of each retry.
 */
export async function retry(call, { codeOf, backoff, attempts, onRetry = () => {}, sleep = sleepMs }) {
  backoff.reset();
  for (let attempt = 1; ; attempt++) {
    try {
      return await call();
    } catch (err) {
      const code = codeOf(err);
      if (!RETRY_CODES.has(code) || attempt >= attempts) throw err;
      const delay = backoff.nextDelayMs();
      onRetry(err, code, attempt, delay);
      await sleep(delay);
    }
  }
}
