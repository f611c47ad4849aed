#!/usr/bin/env python3
"""Publishes messages to a topic, one Publish call each or in BatchPublish
calls, with attributes, a deadline per call, and a W3C `traceparent` header.

    python publish.py --topic orders --count 10 --attr source=example
    python publish.py --topic orders --count 1000 --batch 100

Message i (from 1) has the payload "<prefix><i>". Prints "SEQUENCE
MESSAGE_ID" per stored message, in order.

Every call carries a `traceparent` metadata header: one trace for the whole
run, a new span id per call. Sluice makes its `sluice.publish` span a child of
it (when it exports traces) and stores the message with a `traceparent`
attribute, so consumers can continue the trace.

A call that fails is not retried here: a publish that timed out may still
have been stored, and retrying it could store the message twice.
"""

import argparse
import sys

from sluice_client import (CHANNEL_OPTIONS, DEFAULT_ADDR, DEFAULT_PROTO, load_stubs,
                           new_trace_id, traceparent)


def attribute(text):
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"want K=V, got {text!r}")
    return k, v


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default=DEFAULT_ADDR, help="HOST:PORT [SLUICE_ADDR]")
    p.add_argument("--proto", default=DEFAULT_PROTO, help="the proto/ directory")
    p.add_argument("--topic", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--prefix", default="message-", help="payload of message i: PREFIX + i")
    p.add_argument("--attr", type=attribute, action="append", default=[], metavar="K=V")
    p.add_argument("--batch", type=int, default=0,
                   help="messages per BatchPublish call (0: one Publish call each)")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of each call, seconds")
    args = p.parse_args()

    pb, pb_grpc = load_stubs(args.proto)
    import grpc

    attributes = dict(args.attr)
    trace_id = new_trace_id()
    print(f"publish: trace id {trace_id}", file=sys.stderr)
    payloads = [f"{args.prefix}{i}".encode() for i in range(1, args.count + 1)]
    with grpc.insecure_channel(args.addr, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.SluiceStub(channel)
        try:
            if args.batch <= 0:
                for payload in payloads:
                    r = stub.Publish(
                        pb.PublishRequest(topic=args.topic, payload=payload,
                                          attributes=attributes),
                        timeout=args.timeout,
                        metadata=[("traceparent", traceparent(trace_id))])
                    print(r.sequence, r.message_id, flush=True)
            else:
                for start in range(0, len(payloads), args.batch):
                    r = stub.BatchPublish(
                        pb.BatchPublishRequest(topic=args.topic, messages=[
                            pb.BatchMessage(payload=x, attributes=attributes)
                            for x in payloads[start:start + args.batch]]),
                        timeout=args.timeout,
                        metadata=[("traceparent", traceparent(trace_id))])
                    for res in r.results:  # one per message, in order
                        print(res.sequence, res.message_id, flush=True)
        except grpc.RpcError as e:
            hint = (" (the broker may still have stored it)"
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "")
            print(f"publish: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
            return 1
    print(f"publish: {len(payloads)} messages to {args.topic}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
