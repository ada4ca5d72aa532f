"""Reference peers for the ZeroMQ interop tests (hermes-zmq 1.3.0, pyzmq).

Usage: zmq_peer.py MODE ARGS...
  node-pub ADDR NAME CHANNEL SECONDS   hermes Node publishing a Message
                                       struct and a list every 20 ms
  recv ADDR COUNT SECONDS [TOPICS]     hermes Receiver (subscribed to the
                                       bare TOPICS string, as the reference
                                       passes it; default everything);
                                       prints each envelope as a JSON line
  libzmq-proxy IN OUT                  zmq.proxy(XSUB IN, XPUB OUT)
  sub ADDR PREFIX COUNT SECONDS        raw SUB with a byte prefix; prints
                                       each message's frames as a JSON list
Every mode ends by itself within SECONDS (or when killed).
"""
import json
import sys
import time

import zmq


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def node_pub(addr, name, channel, seconds):
    from hermes import Message, Node, Publisher

    pub = Publisher(addr, name + "-pub")
    node = Node(name, publisher=pub)
    node.start()
    end = time.time() + float(seconds)
    while pub.sock is None and time.time() < end:
        time.sleep(0.01)
    out({"ready": True})
    seq = 0
    while time.time() < end:
        node.publish(channel, Message())
        node.publish(channel, ["Tick", time.time(), seq, "caf\u00e9"])
        seq += 1
        time.sleep(0.02)
    node.stop()


def recv(addr, count, seconds, topics=None):
    from hermes import Receiver

    r = Receiver(addr, "py-recv", topics=topics)
    r.start()
    out({"ready": True})
    got = 0
    end = time.time() + float(seconds)
    while got < int(count) and time.time() < end:
        env = r.recv()
        if env is None:
            time.sleep(0.005)
            continue
        data = env.data
        if not isinstance(data, (list, str, int, float, dict, type(None))):
            data = repr(data)
        out({"topic": env.topic, "origin": env.origin, "data": data, "ts": env.ts})
        got += 1
    r.stop(timeout=2)


def libzmq_proxy(front, back):
    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB)
    xsub.bind(front)
    xpub = ctx.socket(zmq.XPUB)
    xpub.bind(back)
    out({"ready": True})
    zmq.proxy(xsub, xpub)


def sub(addr, prefix, count, seconds):
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, prefix.encode("utf-8"))
    s.connect(addr)
    out({"ready": True})
    got = 0
    end = time.time() + float(seconds)
    while got < int(count) and time.time() < end:
        if s.poll(50):
            frames = s.recv_multipart()
            out([f.decode("utf-8", "replace") for f in frames])
            got += 1


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    {"node-pub": node_pub, "recv": recv, "libzmq-proxy": libzmq_proxy, "sub": sub}[mode](*args)
