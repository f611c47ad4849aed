#!/usr/bin/env python3
"""Prints each topic's stats and its consumer groups' cursors.

    python stats.py [TOPIC]...        (no TOPIC: every topic)
"""

import argparse
import datetime
import sys

from sluice_client import CHANNEL_OPTIONS, DEFAULT_ADDR, DEFAULT_PROTO, load_stubs


def when(ms):
    """Unix milliseconds as UTC text ("-" for 0, which means never)."""
    if not ms:
        return "-"
    t = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default=DEFAULT_ADDR, help="HOST:PORT [SLUICE_ADDR]")
    p.add_argument("--proto", default=DEFAULT_PROTO, help="the proto/ directory")
    p.add_argument("topics", nargs="*")
    args = p.parse_args()

    pb, pb_grpc = load_stubs(args.proto)
    import grpc

    with grpc.insecure_channel(args.addr, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.SluiceStub(channel)
        try:
            r = stub.GetTopicStats(pb.GetTopicStatsRequest(topics=args.topics), timeout=5)
        except grpc.RpcError as e:
            # NOT_FOUND names an unknown topic.
            print(f"stats: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    for s in r.stats:
        print(f"{s.topic}: {s.total_messages} messages, sequences {s.first_sequence}.."
              f"{s.last_sequence} (last stored {when(s.last_message_timestamp)})")
        for g in s.consumer_groups:
            print(f"  group {g.group_name}: cursor {g.cursor_sequence}, "
                  f"pending {g.pending_count}, last ack {when(g.last_ack_timestamp)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
