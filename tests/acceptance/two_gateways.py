"""The check a user runs against two Sluice gateways sharing one JetStream
cluster (README, "Outgrowing one machine"): publish through one gateway,
consume through the other, with a stock gRPC client (grpcio) and stubs
generated from proto/ at run time.

    python two_gateways.py PROTO_DIR A_HOST:PORT B_HOST:PORT

Exits 0 when every check holds; otherwise prints what failed and exits 1.
"""

import os
import queue
import sys
import tempfile
import threading
import time
import uuid


def stubs(proto_dir):
    """Generates and imports the sluice.v1 stubs."""
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="sluice-stubs-")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main([
        "protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(proto_dir, "sluice", "v1", "sluice.proto"),
    ])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    from sluice.v1 import sluice_pb2, sluice_pb2_grpc
    return sluice_pb2, sluice_pb2_grpc


def check(ok, what):
    if not ok:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def main():
    proto_dir, a_addr, b_addr = sys.argv[1:4]
    pb, pb_grpc = stubs(proto_dir)
    import grpc

    channels = [grpc.insecure_channel(a_addr), grpc.insecure_channel(b_addr)]
    # A gateway on a fresh cluster serves once the cluster has elected the
    # leaders of what it created (seconds): wait for both, as a user would.
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=60)
    a, b = (pb_grpc.SluiceStub(ch) for ch in channels)
    topic = "acceptance-" + uuid.uuid4().hex[:8]

    # Publish through A: 50 unary calls with attributes, one batch of 50.
    acked = []
    for i in range(50):
        r = a.Publish(pb.PublishRequest(topic=topic, payload=f"m{i}".encode(),
                                        attributes={"n": str(i)}), timeout=5)
        acked.append((r.sequence, r.message_id, f"m{i}".encode()))
    batch = a.BatchPublish(pb.BatchPublishRequest(topic=topic, messages=[
        pb.BatchMessage(payload=f"m{i}".encode()) for i in range(50, 100)]), timeout=5)
    acked += [(r.sequence, r.message_id, f"m{50 + i}".encode())
              for i, r in enumerate(batch.results)]
    check(len(acked) == 100, "100 messages published through gateway A")

    # Consume through B: a consumer group from the earliest message.
    upstream = queue.Queue()

    def requests():
        while True:
            m = upstream.get()
            if m is None:
                return
            yield m

    upstream.put(pb.SubscribeUpstream(init=pb.SubscriptionInit(
        topic=topic, consumer_group="acceptance",
        initial_position=pb.EARLIEST)))
    upstream.put(pb.SubscribeUpstream(credit=pb.CreditGrant(credits=200)))
    stream = b.Subscribe(requests(), timeout=60)
    got = queue.Queue()

    def read():
        try:
            for down in stream:
                if down.HasField("delivery"):
                    got.put(down.delivery)
        except grpc.RpcError as e:
            got.put(e)

    threading.Thread(target=read, daemon=True).start()

    def take(n, within):
        out = []
        deadline = time.time() + within
        while len(out) < n:
            try:
                d = got.get(timeout=max(0.0, deadline - time.time()))
            except queue.Empty:
                break
            if isinstance(d, Exception):
                print(f"stream ended: {d}")
                break
            out.append(d)
        return out

    backlog = take(100, 10)
    check([(d.sequence, d.message_id, d.payload) for d in backlog] == acked,
          "gateway B delivers all 100, in order, with A's ids and payloads")
    check(backlog[7].attributes.get("n") == "7", "attributes travel")

    # Live: published through A while subscribed on B.
    started = time.time()
    live_acked = [a.Publish(pb.PublishRequest(topic=topic, payload=f"live{i}".encode()),
                            timeout=5) for i in range(10)]
    live = take(10, 5)
    check([d.message_id for d in live] == [r.message_id for r in live_acked],
          f"10 live messages reach B ({time.time() - started:.3f} s)")

    # Ack everything; both gateways report the group's cursor there.
    upstream.put(pb.SubscribeUpstream(ack=pb.Ack(message_id=live[-1].message_id)))
    last = live_acked[-1].sequence
    cursors = {}
    deadline = time.time() + 5
    while time.time() < deadline:
        for name, stub in (("A", a), ("B", b)):
            stats = stub.GetTopicStats(pb.GetTopicStatsRequest(topics=[topic]), timeout=5)
            groups = {g.group_name: g for g in stats.stats[0].consumer_groups}
            g = groups.get("acceptance")
            cursors[name] = g.cursor_sequence if g else None
        if cursors == {"A": last, "B": last}:
            break
        time.sleep(0.1)
    check(cursors == {"A": last, "B": last},
          f"the cursor is at the last message on both gateways: {cursors}")
    upstream.put(None)
    print("all checks passed")


if __name__ == "__main__":
    main()
