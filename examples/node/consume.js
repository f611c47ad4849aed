#!/usr/bin/env node
// Consumes a topic as a member of a consumer group, the way a service would.
//
//   node consume.js --topic orders --group billing [--count N]
//
// - Opens Subscribe with a SubscriptionInit, then grants a credit window and
//   tops it up as messages are handled (not once: that stalls after one window).
// - Processes each delivery, then acks in batches (every --ack-every messages,
//   or every --ack-interval-ms when traffic pauses), never past a message that
//   is not finished (acks are cumulative).
// - A processing error Nacks that message with a delay (--nack-delay-ms); the
//   broker delivers it again with deliveryCount one higher.
// - UNAVAILABLE (the broker restarted or is not up, the network dropped, a
//   gateway gave the group up) subscribes again after a capped exponential
//   backoff with jitter; the new stream resumes after the group's cursor, so
//   nothing is skipped. Messages handled before the break come again
//   (at-least-once) and are recognised as duplicates.
// - ABORTED (another consumer took the group over) or a StreamError (the topic
//   or the group was deleted) ends the program with a message and exit code 1.
// - SIGINT or SIGTERM: finishes the message in hand, acks everything handled,
//   closes the stream and exits 0.
//
// Prints one line per processed message to stdout, "SEQUENCE MESSAGE_ID
// DELIVERY_COUNT PAYLOAD", and what it does to stderr. --count N exits after N
// distinct messages were processed.

import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';

import { AckTracker, Backoff, CreditWindow } from './lib/flow.js';
import { connect, DEFAULT_ADDR, DEFAULT_PROTO, grpc, statusName, unary } from './lib/sluice.js';

const log = (text) => console.error(`consume: ${text}`);

class Fatal extends Error {} // ends the program; the message says why
class Reconnect extends Error {} // subscribing again fixes it
class ProcessingError extends Error {}

function options() {
  const { values: v } = parseArgs({
    options: {
      addr: { type: 'string', default: DEFAULT_ADDR },
      proto: { type: 'string', default: DEFAULT_PROTO },
      topic: { type: 'string' },
      group: { type: 'string', default: 'default' },
      'consumer-id': { type: 'string', default: 'consume.js' },
      from: { type: 'string', default: 'earliest' },
      count: { type: 'string', default: String(Number.MAX_SAFE_INTEGER) },
      window: { type: 'string', default: '32' },
      'ack-every': { type: 'string', default: '16' },
      'ack-interval-ms': { type: 'string', default: '200' },
      'nack-delay-ms': { type: 'string', default: '500' },
      'max-backoff': { type: 'string', default: '5' },
      'process-ms': { type: 'string', default: '0' },
      'fail-every': { type: 'string', default: '0' },
    },
  });
  const int = (name, min) => {
    const n = Number(v[name]);
    if (!Number.isInteger(n) || n < min) throw new Fatal(`--${name} wants an integer >= ${min}, got ${v[name]}`);
    return n;
  };
  if (!v.topic) throw new Fatal('--topic is required');
  if (!['earliest', 'latest'].includes(v.from)) throw new Fatal('--from wants earliest or latest');
  const maxBackoff = Number(v['max-backoff']);
  if (!(maxBackoff > 0)) throw new Fatal('--max-backoff wants seconds > 0');
  return {
    addr: v.addr,
    proto: v.proto,
    topic: v.topic,
    group: v.group,
    consumerId: v['consumer-id'],
    from: v.from,
    count: int('count', 0),
    window: int('window', 1),
    ackEvery: int('ack-every', 1),
    ackIntervalMs: int('ack-interval-ms', 1),
    nackDelayMs: int('nack-delay-ms', 0),
    maxBackoffMs: maxBackoff * 1000,
    processMs: int('process-ms', 0),
    failEvery: int('fail-every', 0),
  };
}

class Consumer {
  constructor(opts) {
    this.opts = opts;
    this.client = connect(opts.addr, opts.proto);
    this.tracker = new AckTracker();
    this.credit = new CreditWindow(opts.window);
    this.backoff = new Backoff({ baseMs: 100, capMs: opts.maxBackoffMs });
    this.stats = { processed: 0, failures: 0, duplicates: 0, reconnects: 0 };
    this.stopping = false;
    this.busy = false; // processing a message
    this.call = null; // the current stream
    this.closing = null; // the promise of close() once it started
    this.pause = new AbortController(); // cuts a backoff wait short
  }

  // The application's work. Here: print it, after --process-ms; with
  // --fail-every K, the first delivery of each message whose sequence is a
  // multiple of K fails (to show Nack).
  async process(d) {
    if (this.opts.processMs) await sleep(this.opts.processMs);
    const k = BigInt(this.opts.failEvery);
    if (k && BigInt(d.sequence) % k === 0n && d.deliveryCount === 1) {
      throw new ProcessingError(`simulated failure of sequence ${d.sequence}`);
    }
    console.log(`${d.sequence} ${d.messageId} ${d.deliveryCount} ${d.payload.toString('utf8')}`);
  }

  stop() {
    this.stopping = true;
    this.pause.abort();
    // Idle on a stream: close it now. Busy: the loop closes it after the
    // message in hand.
    if (this.call && !this.busy && !this.closing) {
      const call = this.call;
      this.closing = this.close(call).finally(() => call.cancel());
    }
  }

  async run() {
    while (!this.stopping) {
      try {
        await this.session();
        return;
      } catch (err) {
        if (!(err instanceof Reconnect)) throw err;
        if (this.stopping) return;
        const delay = this.backoff.nextDelayMs();
        this.stats.reconnects += 1;
        log(`${err.message}; reconnecting in ${(delay / 1000).toFixed(2)} s`);
        await sleep(delay, undefined, { signal: this.pause.signal }).catch(() => {});
      }
    }
  }

  // Runs one stream; returns when done or stopped, throws Reconnect or Fatal.
  async session() {
    const { opts, tracker } = this;
    tracker.newStream();
    this.closing = null;
    // No deadline: the stream lives as long as the consumer does.
    const call = this.client.subscribe();
    this.call = call;
    call.write({
      init: {
        topic: opts.topic,
        consumerGroup: opts.group,
        consumerId: opts.consumerId,
        initialPosition: opts.from === 'latest' ? 'LATEST' : 'EARLIEST',
      },
    });
    call.write({ credit: { credits: this.credit.openingGrant() } });
    const timer = setInterval(() => this.flushAcks(call), opts.ackIntervalMs);
    try {
      for await (const down of call) {
        this.backoff.reset(); // the broker answers: start the next backoff small
        if (down.response === 'error') {
          throw new Fatal(`the broker ended the stream: ${down.error.code}: ${down.error.message}`);
        }
        if (this.closing) continue; // deliveries after close: the group's next consumer gets them
        if (down.response === 'delivery') await this.handle(call, down.delivery);
        if (tracker.pendingAcks() >= opts.ackEvery) this.flushAcks(call);
        if (this.stopping || this.stats.processed >= opts.count) {
          this.closing = this.close(call);
          await this.closing;
          return;
        }
      }
      if (this.closing) return await this.closing;
      throw new Reconnect('the broker ended the stream');
    } catch (err) {
      if (err instanceof Fatal || err instanceof Reconnect) throw err;
      if (this.closing) return await this.closing; // we cancelled it
      if (err.code === grpc.status.UNAVAILABLE) throw new Reconnect(`UNAVAILABLE: ${err.details}`);
      if (err.code === grpc.status.ABORTED) {
        throw new Fatal(
          `another consumer subscribed to topic ${opts.topic} with group ${opts.group} and took ` +
            `it over (one active consumer per group): ${err.details}`,
        );
      }
      throw new Fatal(`Subscribe failed: ${statusName(err.code)}: ${err.details ?? err.message}`);
    } finally {
      clearInterval(timer);
      this.call = null;
      call.cancel(); // ends the stream (a no-op once it ended)
    }
  }

  async handle(call, d) {
    const { tracker } = this;
    const seq = BigInt(d.sequence);
    this.busy = true;
    try {
      if (tracker.isDuplicate(seq)) {
        // Already processed before a reconnect: ack it again, do not redo it.
        this.stats.duplicates += 1;
        tracker.finish(seq, d.messageId);
      } else {
        tracker.started(seq, d.messageId);
        try {
          await this.process(d);
          tracker.finish(seq, d.messageId);
          this.stats.processed += 1;
        } catch (err) {
          if (!(err instanceof ProcessingError)) throw err;
          this.stats.failures += 1;
          log(`${err.message}; nack, redelivery in ${this.opts.nackDelayMs} ms`);
          call.write({ nack: { messageId: d.messageId, redeliveryDelayMs: this.opts.nackDelayMs } });
        }
      }
      // Handled (processed, nacked or skipped): give its credit back.
      const grant = this.credit.handled();
      if (grant) call.write({ credit: { credits: grant } });
    } finally {
      this.busy = false;
    }
  }

  flushAcks(call) {
    if (call.writableEnded) return;
    const taken = this.tracker.takeAckable();
    if (!taken.length) return;
    // Cumulative: the cursor moves to the highest of these ids.
    call.write({ batchAck: { messageIds: taken.map(([, id]) => id) } });
    this.tracker.acked(taken);
  }

  // Acks what was handled and half-closes. The broker ends a stream that
  // still has credit only when the client cancels it, so first confirm that it
  // has read the acks (the group's cursor reached the last one; at most 2 s);
  // the caller then cancels.
  async close(call) {
    this.flushAcks(call);
    call.end();
    const target = this.tracker.ackedUpTo;
    const deadline = Date.now() + 2000;
    while (target > 0n && Date.now() < deadline) {
      let stats;
      try {
        ({ stats } = await unary(this.client, 'getTopicStats', { topics: [this.opts.topic] }, { timeoutMs: 1000 }));
      } catch {
        return;
      }
      const group = stats.flatMap((s) => s.consumerGroups).find((g) => g.groupName === this.opts.group);
      if (group && BigInt(group.cursorSequence) >= target) return;
      await sleep(20);
    }
  }
}

let consumer;
try {
  consumer = new Consumer(options());
  for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => consumer.stop());
  await consumer.run();
} catch (err) {
  if (!(err instanceof Fatal)) throw err;
  log(err.message);
  process.exitCode = 1;
} finally {
  if (consumer) {
    consumer.client.close();
    const s = consumer.stats;
    log(
      `processed ${s.processed} messages (${s.failures} failures nacked, ` +
        `${s.duplicates} duplicates skipped, ${s.reconnects} reconnects)`,
    );
  }
}
