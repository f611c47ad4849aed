"""What the three examples share: sluice.v1 stubs generated from proto/ when
a program starts, one channel setup, W3C traceparent values, the consumer's
bookkeeping (credit window, acks, backoff) and the publisher's retry loop.
The bookkeeping is plain Python with no gRPC in it; test_flow.py checks it.
"""

import atexit
import os
import random
import secrets
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO = os.environ.get("SLUICE_PROTO") or os.path.normpath(
    os.path.join(HERE, "..", "..", "proto"))
DEFAULT_ADDR = os.environ.get("SLUICE_ADDR", "127.0.0.1:50051")

# Long-lived streams want keepalive (the broker answers a ping every 10 s or
# more often), and the channel's own reconnect attempts should not wait longer
# than our backoff does.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


def load_stubs(proto_dir=DEFAULT_PROTO):
    """Generates the sluice.v1 stubs from proto_dir into a temporary
    directory (removed at exit) and imports them: (sluice_pb2,
    sluice_pb2_grpc). Generating them each time means they can never be
    stale; README.md shows the command to generate them once instead."""
    try:
        import grpc  # noqa: F401
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit("grpcio and grpcio-tools are missing: "
                 "pip install grpcio==1.68.1 grpcio-tools==1.68.1 (see README.md)")
    proto = os.path.join(proto_dir, "sluice", "v1", "sluice.proto")
    if not os.path.exists(proto):
        sys.exit(f"no {proto}: pass --proto DIR (the repository's proto/) or set SLUICE_PROTO")
    out = tempfile.mkdtemp(prefix="sluice-stubs-")
    atexit.register(shutil.rmtree, out, True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{well_known}",
                      f"--python_out={out}", f"--grpc_python_out={out}", proto])
    if rc != 0:
        sys.exit(f"protoc could not compile {proto} (exit {rc})")
    sys.path.insert(0, out)
    from sluice.v1 import sluice_pb2, sluice_pb2_grpc
    return sluice_pb2, sluice_pb2_grpc


def new_trace_id():
    """32 hex digits, not all zero (W3C Trace Context)."""
    while True:
        t = secrets.token_hex(16)
        if int(t, 16):
            return t


def traceparent(trace_id):
    """A W3C `traceparent` for a new span (random 16-hex-digit span id) in the
    trace `trace_id`, sampled: version 00, flags 01."""
    while True:
        span = secrets.token_hex(8)
        if int(span, 16):
            return f"00-{trace_id}-{span}-01"


class Backoff:
    """Capped exponential backoff with jitter: base, 2*base, 4*base, ... up to
    cap, each delay drawn from [d/2, d] so that many consumers restarted by the
    same outage do not all come back at the same instant."""

    def __init__(self, base=0.1, cap=5.0, rng=random.random):
        self.base, self.cap, self.rng = base, cap, rng
        self.attempt = 0

    def next_delay(self):
        d = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return d / 2 + self.rng() * d / 2

    def reset(self):
        self.attempt = 0


# A call that failed with one of these may or may not have been carried out:
# the broker was unreachable or the deadline passed before the reply came.
# Retrying is safe only when the retry cannot store a message twice, which is
# what idempotency keys are for. Any other code is an answer: retrying cannot
# change it.
RETRY_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


def retry(call, code_of, backoff, attempts, on_retry=None, sleep=time.sleep):
    """Returns call(), calling it again after a backoff delay while it raises
    an error whose status name (code_of(error); None: not a gRPC error) is in
    RETRY_CODES, at most `attempts` times in all; then raises the last error.
    on_retry(error, code, attempt, delay) is told of each retry."""
    backoff.reset()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:
            code = code_of(e)
            if code not in RETRY_CODES or attempt == attempts:
                raise
            delay = backoff.next_delay()
            if on_retry:
                on_retry(e, code, attempt, delay)
            sleep(delay)


class CreditWindow:
    """Keeps about `window` deliveries in flight. A stream starts with no
    credit; grant the whole window first, then give back the credit each
    handled delivery spent (a success, a failure that was nacked, or a
    duplicate), in grants of at least half the window so that a fast stream
    does not send one CreditGrant per message. Granting only once is the
    classic mistake: the stream stalls after `window` messages."""

    def __init__(self, window):
        if window < 1:
            raise ValueError("the credit window must be at least 1")
        self.window = window
        self.owed = 0

    def opening_grant(self):
        """The grant for a new stream (each stream starts at zero credit)."""
        self.owed = 0
        return self.window

    def handled(self):
        """One delivery was handled; returns the credit to grant now (0: not yet)."""
        self.owed += 1
        if self.owed >= max(1, self.window // 2):
            grant, self.owed = self.owed, 0
            return grant
        return 0


class AckTracker:
    """Which acks are safe to send.

    Sluice's acks are cumulative: acking a message moves the group's cursor to
    its sequence, and so also acknowledges every earlier message (a BatchAck
    moves it to the highest of its ids). So a consumer may ack a message only
    when every message delivered before it is finished too; a message that
    failed and was nacked holds the acks behind it back until its redelivery
    succeeds (acking past it would cancel the redelivery).

    It also recognises duplicates: delivery is at-least-once, so after a
    reconnect the broker delivers again what was not yet acknowledged (and,
    after a broker crash, possibly a few acks it had not written yet). It
    remembers only what is not acked yet, so it stays small."""

    def __init__(self):
        self.unfinished = {}  # sequence -> id: delivered on this stream, not finished
        self.finished = {}  # sequence -> id: finished on this stream, not acked
        self.done_earlier = set()  # finished on an earlier stream, never acked
        self.acked_upto = 0  # highest sequence acked

    def new_stream(self):
        """A new Subscribe stream starts after the group's cursor, so it
        delivers again everything not acked. What an earlier stream finished
        but could not ack is a duplicate when it comes again; it may be acked
        only once it has (in order, behind anything that failed on this
        stream)."""
        self.done_earlier.update(self.finished)
        self.finished.clear()
        self.unfinished.clear()

    def is_duplicate(self, seq):
        return seq <= self.acked_upto or seq in self.finished or seq in self.done_earlier

    def started(self, seq, message_id):
        self.unfinished[seq] = message_id

    def finish(self, seq, message_id):
        """Processed, or recognised as a duplicate: may be acked."""
        self.unfinished.pop(seq, None)
        self.done_earlier.discard(seq)
        if seq > self.acked_upto:
            self.finished[seq] = message_id

    def pending_acks(self):
        return len(self.finished)

    def take_ackable(self):
        """(sequence, id) pairs that can be acked now, in sequence order:
        finished, and below every unfinished message. Call `acked` with them
        once they were sent."""
        floor = min(self.unfinished) if self.unfinished else None
        return [(s, self.finished[s]) for s in sorted(self.finished)
                if floor is None or s < floor]

    def acked(self, taken):
        for s, _ in taken:
            del self.finished[s]
            self.acked_upto = max(self.acked_upto, s)
        self.done_earlier = {s for s in self.done_earlier if s > self.acked_upto}
