#!/usr/bin/env python3
"""Consumes a topic as a member of a consumer group, the way a service would.

    python consume.py --topic orders --group billing [--count N]

- Opens Subscribe with SubscriptionInit, then grants a credit window and tops
  it up as messages are handled (not once: that stalls after one window).
- Processes each delivery, then acks in batches (every --ack-every messages,
  or every --ack-interval-ms when traffic pauses), never past a message that
  is not finished (acks are cumulative).
- A processing error Nacks that message with a delay (--nack-delay-ms); the
  broker delivers it again with delivery_count one higher.
- UNAVAILABLE (the broker restarted, the network dropped, a gateway gave the
  group up) subscribes again after a capped exponential backoff with jitter,
  and waits for the broker while it is unreachable; the new stream resumes
  after the group's cursor, so nothing is skipped. Messages handled
  before the break come again (at-least-once) and are recognised as
  duplicates.
- ABORTED (another consumer took the group over) or a StreamError (the topic
  or the group was deleted) ends the program with a message and exit code 1.
- SIGINT or SIGTERM: finishes the message in hand, acks everything handled,
  closes the stream and exits 0.

Prints one line per processed message to stdout, "SEQUENCE MESSAGE_ID
DELIVERY_COUNT PAYLOAD", and what it does to stderr. --count N exits after N
distinct messages were processed.
"""

import argparse
import queue
import signal
import sys
import threading
import time

from sluice_client import (AckTracker, Backoff, CHANNEL_OPTIONS, CreditWindow,
                           DEFAULT_ADDR, DEFAULT_PROTO, load_stubs)


def log(text):
    print(f"consume: {text}", file=sys.stderr, flush=True)


class ProcessingError(Exception):
    pass


class Fatal(Exception):
    """Ends the program: the message says why."""


class Reconnect(Exception):
    """The stream broke in a way that subscribing again fixes."""


_END = object()  # the stream ended without an error


class Consumer:
    def __init__(self, args, pb, pb_grpc, grpc):
        self.args, self.pb, self.grpc = args, pb, grpc
        self.channel = grpc.insecure_channel(args.addr, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.SluiceStub(self.channel)
        self.tracker = AckTracker()
        self.credit = CreditWindow(args.window)
        self.stop = threading.Event()
        self.processed = 0  # distinct messages processed
        self.failures = self.duplicates = self.reconnects = 0

    # -- what the service does with a message ---------------------------------

    def process(self, d):
        """The application's work. Here: print it, after --process-ms; with
        --fail-every K, the first delivery of each message whose sequence is a
        multiple of K fails (to show Nack)."""
        if self.args.process_ms:
            time.sleep(self.args.process_ms / 1000)
        k = self.args.fail_every
        if k and d.sequence % k == 0 and d.delivery_count == 1:
            raise ProcessingError(f"simulated failure of sequence {d.sequence}")
        payload = d.payload.decode("utf-8", "replace")
        print(f"{d.sequence} {d.message_id} {d.delivery_count} {payload}", flush=True)

    # -- one Subscribe stream -------------------------------------------------

    def up(self, **kw):
        self.outbox.put(self.pb.SubscribeUpstream(**kw))

    def flush_acks(self):
        taken = self.tracker.take_ackable()
        if taken:
            # Cumulative: the cursor moves to the highest of these ids.
            self.up(batch_ack=self.pb.BatchAck(message_ids=[i for _, i in taken]))
            self.tracker.acked(taken)

    def session(self, backoff):
        """Runs one stream; returns when done or stopped, raises Reconnect
        or Fatal."""
        pb, a = self.pb, self.args
        # This stream's own queues: a stream that broke must never take what
        # is meant for its successor.
        outbox, inbox = queue.Queue(), queue.Queue()
        self.outbox = outbox
        self.tracker.new_stream()

        def requests():
            while True:
                m = outbox.get()
                if m is None:
                    return  # half-close: nothing more to send on this stream
                yield m

        self.up(init=pb.SubscriptionInit(
            topic=a.topic, consumer_group=a.group, consumer_id=a.consumer_id,
            initial_position=pb.EARLIEST if a.start == "earliest" else pb.LATEST))
        self.up(credit=pb.CreditGrant(credits=self.credit.opening_grant()))
        # wait_for_ready: while the broker is unreachable the call waits for
        # the channel to connect (the channel retries with its own capped
        # backoff, CHANNEL_OPTIONS) rather than failing at once. Without it,
        # grpcio (1.68) fails each new call at once while the channel is in
        # TRANSIENT_FAILURE and, with no call in progress, never completed
        # the reconnection in our tests.
        call = self.stub.Subscribe(requests(), wait_for_ready=True)

        def read():
            try:
                for down in call:
                    inbox.put(down)
                inbox.put(_END)
            except self.grpc.RpcError as e:
                inbox.put(e)

        threading.Thread(target=read, daemon=True).start()
        last_flush = time.monotonic()
        try:
            while True:
                if self.stop.is_set() or self.processed >= a.count:
                    self.close()
                    return
                try:
                    item = inbox.get(timeout=a.ack_interval_ms / 1000)
                except queue.Empty:
                    item = None
                if item is _END:
                    raise Reconnect("the broker ended the stream")
                if isinstance(item, self.grpc.RpcError):
                    self.failed(item)
                if item is not None:
                    backoff.reset()  # the broker answers: start the next backoff small
                    kind = item.WhichOneof("response")
                    if kind == "error":
                        raise Fatal(f"the broker ended the stream: {item.error.code}: "
                                    f"{item.error.message}")
                    if kind == "delivery":
                        self.handle(item.delivery)
                if (self.tracker.pending_acks() >= a.ack_every
                        or time.monotonic() - last_flush >= a.ack_interval_ms / 1000):
                    self.flush_acks()
                    last_flush = time.monotonic()
        finally:
            outbox.put(None)
            call.cancel()  # ends the stream (a no-op once it ended)

    def handle(self, d):
        t = self.tracker
        if t.is_duplicate(d.sequence):
            # Already processed before a reconnect: ack it again, do not redo it.
            self.duplicates += 1
            t.finish(d.sequence, d.message_id)
        else:
            t.started(d.sequence, d.message_id)
            try:
                self.process(d)
            except ProcessingError as e:
                self.failures += 1
                log(f"{e}; nack, redelivery in {self.args.nack_delay_ms} ms")
                self.up(nack=self.pb.Nack(message_id=d.message_id,
                                          redelivery_delay_ms=self.args.nack_delay_ms))
            else:
                t.finish(d.sequence, d.message_id)
                self.processed += 1
        # Handled (processed, nacked or skipped): give its credit back.
        grant = self.credit.handled()
        if grant:
            self.up(credit=self.pb.CreditGrant(credits=grant))

    def failed(self, e):
        code, details = e.code(), e.details()
        if code == self.grpc.StatusCode.UNAVAILABLE:
            raise Reconnect(f"UNAVAILABLE: {details}")
        if code == self.grpc.StatusCode.ABORTED:
            raise Fatal(f"another consumer subscribed to topic {self.args.topic!r} with group "
                        f"{self.args.group!r} and took it over (one active consumer per "
                        f"group): {details}")
        raise Fatal(f"Subscribe failed: {code.name}: {details}")

    def close(self):
        """Acks what was handled and half-closes. The broker ends a stream
        that still has credit only when the client cancels it, so first
        confirm that it has read the acks (the group's cursor reached the last
        one; at most 2 s), then cancel."""
        self.flush_acks()
        self.outbox.put(None)
        target, deadline = self.tracker.acked_upto, time.monotonic() + 2
        while target and time.monotonic() < deadline:
            try:
                r = self.stub.GetTopicStats(
                    self.pb.GetTopicStatsRequest(topics=[self.args.topic]), timeout=1)
            except self.grpc.RpcError:
                return
            cursor = next((g.cursor_sequence for s in r.stats for g in s.consumer_groups
                           if g.group_name == self.args.group), 0)
            if cursor >= target:
                return
            time.sleep(0.02)

    # -- the reconnect loop ---------------------------------------------------

    def run(self):
        backoff = Backoff(base=0.1, cap=self.args.max_backoff)
        while not self.stop.is_set():
            try:
                self.session(backoff)
                return
            except Reconnect as why:
                if self.stop.is_set():
                    return
                delay = backoff.next_delay()
                self.reconnects += 1
                log(f"{why}; reconnecting in {delay:.2f} s")
                self.stop.wait(delay)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default=DEFAULT_ADDR, help="HOST:PORT [SLUICE_ADDR]")
    p.add_argument("--proto", default=DEFAULT_PROTO, help="the proto/ directory")
    p.add_argument("--topic", required=True)
    p.add_argument("--group", default="default")
    p.add_argument("--consumer-id", default="consume.py")
    p.add_argument("--from", dest="start", choices=["earliest", "latest"], default="earliest",
                   help="where a new group starts (an existing one resumes after its cursor)")
    p.add_argument("--count", type=int, default=sys.maxsize,
                   help="exit after processing this many distinct messages")
    p.add_argument("--window", type=int, default=32, help="credit window (deliveries in flight)")
    p.add_argument("--ack-every", type=int, default=16, help="ack after this many messages")
    p.add_argument("--ack-interval-ms", type=int, default=200,
                   help="or after this long, whichever comes first")
    p.add_argument("--nack-delay-ms", type=int, default=500)
    p.add_argument("--max-backoff", type=float, default=5.0, help="seconds")
    p.add_argument("--process-ms", type=int, default=0, help="simulated work per message")
    p.add_argument("--fail-every", type=int, default=0,
                   help="simulate a failure of sequences that are multiples of K")
    args = p.parse_args()
    if args.window < 1 or args.ack_every < 1 or args.ack_interval_ms < 1:
        p.error("--window, --ack-every and --ack-interval-ms must be at least 1")

    pb, pb_grpc = load_stubs(args.proto)
    import grpc

    consumer = Consumer(args, pb, pb_grpc, grpc)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: consumer.stop.set())
    try:
        consumer.run()
    except Fatal as e:
        log(str(e))
        return 1
    finally:
        consumer.channel.close()
        log(f"processed {consumer.processed} messages ({consumer.failures} failures nacked, "
            f"{consumer.duplicates} duplicates skipped, {consumer.reconnects} reconnects)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
