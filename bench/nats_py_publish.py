#!/usr/bin/env python3
"""Baseline for bench/jetstream.sh: NATS's own Python client (nats-py) publishing
256-byte messages straight to JetStream with INFLIGHT acks outstanding (that many
concurrent publishers, each awaiting its ack), to an R<REPLICAS> stream, for SECS
seconds. Usage: nats_py_publish.py SERVERS SECS INFLIGHT REPLICAS"""
import asyncio
import sys
import time

import nats


async def main(servers, secs, inflight, replicas):
    nc = await nats.connect(servers.split(","))
    js = nc.jetstream()
    # The cluster may still be electing its meta leader.
    deadline = time.monotonic() + 30
    while True:
        try:
            try:
                await js.delete_stream("BENCHPY")
            except nats.js.errors.NotFoundError:
                pass
            await js.add_stream(name="BENCHPY", subjects=["benchpy.>"], num_replicas=replicas)
            break
        except Exception as e:  # noqa: BLE001 - any failure: retry until the deadline
            if time.monotonic() > deadline:
                raise
            print(f"waiting for the cluster: {e!r}", file=sys.stderr)
            await asyncio.sleep(0.5)
    payload = b"x" * 256
    latencies = []
    stop = time.monotonic() + secs

    async def publisher():
        while time.monotonic() < stop:
            t = time.monotonic()
            await js.publish("benchpy.t", payload)
            latencies.append(time.monotonic() - t)

    start = time.monotonic()
    await asyncio.gather(*[publisher() for _ in range(inflight)])
    elapsed = time.monotonic() - start
    latencies.sort()
    n = len(latencies)
    print(
        f"| nats-py JetStream publish 256 B, {inflight} acks outstanding, R{replicas} "
        f"| {n / elapsed:.0f} | {latencies[n // 2] * 1000:.2f} | {latencies[int(n * 0.99)] * 1000:.2f} |"
    )
    await js.delete_stream("BENCHPY")
    await nc.close()


if __name__ == "__main__":
    servers, secs, inflight, replicas = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    asyncio.run(main(servers, secs, inflight, replicas))
