#!/usr/bin/env python3
"""Publishes messages to a topic exactly once, one Publish call each or in
BatchPublish calls, with attributes, a deadline per call, and a W3C
`traceparent` header.

    python publish.py --topic orders --count 10 --attr source=example
    python publish.py --topic orders --count 1000 --batch 100
    python publish.py --topic orders --count 10 --key-prefix orders-2024-06-01/

Message i (from 1) has the payload "<prefix><i>" and the idempotency key
"<key-prefix><i>": its identity in the application, the same in every call
that carries it. Prints "SEQUENCE MESSAGE_ID" per message, in order, with
" duplicate" added when the broker already had that key (the ids are the
stored message's).

A call that fails with UNAVAILABLE or DEADLINE_EXCEEDED may or may not have
been stored. It is sent again, with the same keys, after a capped
exponential backoff with jitter (--attempts, --max-backoff): a message the
lost attempt did store comes back as a duplicate instead of being stored
twice. The broker remembers keys for its dedup window (default 2 min), so
running the program again with the same --key-prefix within it publishes
only what is missing. Without keys, a retry could store a message twice.

Every call carries a `traceparent` metadata header: one trace for the whole
run, a new span id per call. Sluice makes its `sluice.publish` span a child of
it (when it exports traces) and stores the message with a `traceparent`
attribute, so consumers can continue the trace.
"""

import argparse
import secrets
import sys

from sluice_client import (CHANNEL_OPTIONS, DEFAULT_ADDR, DEFAULT_PROTO, RETRY_CODES, Backoff,
                           load_stubs, new_trace_id, retry, traceparent)


def attribute(text):
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"want K=V, got {text!r}")
    return k, v


def log(text):
    print(f"publish: {text}", file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default=DEFAULT_ADDR, help="HOST:PORT [SLUICE_ADDR]")
    p.add_argument("--proto", default=DEFAULT_PROTO, help="the proto/ directory")
    p.add_argument("--topic", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--prefix", default="message-", help="payload of message i: PREFIX + i")
    p.add_argument("--key-prefix", default=f"run-{secrets.token_hex(8)}/",
                   help="idempotency key of message i: KEY_PREFIX + i (default: a new run id)")
    p.add_argument("--attr", type=attribute, action="append", default=[], metavar="K=V")
    p.add_argument("--batch", type=int, default=0,
                   help="messages per BatchPublish call (0: one Publish call each)")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of each call, seconds")
    p.add_argument("--attempts", type=int, default=10, help="calls per message or batch, at most")
    p.add_argument("--max-backoff", type=float, default=5.0, help="seconds")
    args = p.parse_args()
    key_prefix = args.key_prefix
    # Keys are 1 to 128 printable ASCII bytes.
    if (not all(" " <= c <= "~" for c in key_prefix)
            or len(key_prefix) + len(str(args.count)) > 128):
        p.error("--key-prefix wants printable ASCII, at most 128 bytes with the number")
    if args.attempts < 1:
        p.error("--attempts must be at least 1")

    pb, pb_grpc = load_stubs(args.proto)
    import grpc

    attributes = dict(args.attr)
    trace_id = new_trace_id()
    log(f"trace id {trace_id}")
    log(f"idempotency keys {key_prefix}1 to {key_prefix}{args.count}")
    messages = [(f"{args.prefix}{i}".encode(), f"{key_prefix}{i}")
                for i in range(1, args.count + 1)]
    backoff = Backoff(base=0.1, cap=args.max_backoff)
    duplicates = 0

    def send(method, request):
        def on_retry(e, code, attempt, delay):
            log(f"{code}: {e.details()}; retrying in {delay:.2f} s "
                f"(attempt {attempt + 1} of {args.attempts}, same keys)")
        # wait_for_ready: while the broker is unreachable a call waits (up to
        # its deadline) for the channel to reconnect instead of failing at
        # once; grpcio (1.68) does not complete a reconnection while no call
        # is in progress (see consume.py).
        return retry(lambda: method(request, timeout=args.timeout, wait_for_ready=True,
                                    metadata=[("traceparent", traceparent(trace_id))]),
                     code_of=lambda e: e.code().name if isinstance(e, grpc.RpcError) else None,
                     backoff=backoff, attempts=args.attempts, on_retry=on_retry)

    def show(r):
        nonlocal duplicates
        duplicates += r.duplicate
        print(f"{r.sequence} {r.message_id}" + (" duplicate" if r.duplicate else ""),
              flush=True)

    with grpc.insecure_channel(args.addr, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.SluiceStub(channel)
        try:
            if args.batch <= 0:
                for payload, key in messages:
                    show(send(stub.Publish, pb.PublishRequest(
                        topic=args.topic, payload=payload, attributes=attributes,
                        idempotency_key=key)))
            else:
                for start in range(0, len(messages), args.batch):
                    r = send(stub.BatchPublish, pb.BatchPublishRequest(
                        topic=args.topic, messages=[
                            pb.BatchMessage(payload=payload, attributes=attributes,
                                            idempotency_key=key)
                            for payload, key in messages[start:start + args.batch]]))
                    for res in r.results:  # one per message, in order
                        show(res)
        except grpc.RpcError as e:
            log(f"{e.code().name}: {e.details()}")
            if e.code().name in RETRY_CODES:
                log(f"giving up: the last call may or may not have stored its messages; run "
                    f"again with --key-prefix {key_prefix} to publish what is missing, once")
            return 1
    log(f"{len(messages)} messages to {args.topic}: {len(messages) - duplicates} stored, "
        f"{duplicates} duplicates (stored before)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
