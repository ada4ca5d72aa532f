"""libzmq peers with ZMTP heartbeats, for tests/zmq_heartbeat.rs.

Usage: zmq_heartbeat_peer.py FRONT BACK IVL_MS TIMEOUT_MS QUIET_S

A PUB on FRONT and a SUB (prefix '"HB/') on BACK, both with
HEARTBEAT_IVL / HEARTBEAT_TIMEOUT / HEARTBEAT_TTL set and a socket
monitor. Phases: publish until the first message gets through (the
subscription has reached the PUB); publish for 1 s; stay quiet for
QUIET_S (only heartbeats flow: a peer that got no PONG would time out and
disconnect); publish for 1 s again. Prints one JSON line: what was sent
and received in each phase, and the monitor events of each socket.
"""
import json
import sys
import time

import zmq

front, back = sys.argv[1], sys.argv[2]
ivl, timeout, quiet = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

ctx = zmq.Context()
EVENTS = {
    zmq.EVENT_CONNECTED: "connected",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_CLOSED: "closed",
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake_succeeded",
}


def make(kind, addr):
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.HEARTBEAT_IVL, ivl)
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
    s.setsockopt(zmq.HEARTBEAT_TTL, 4 * timeout)
    mon = s.get_monitor_socket(sum(EVENTS))
    if kind == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b'"HB/')
    s.connect(addr)
    return s, mon


def events(mon):
    out = {name: 0 for name in EVENTS.values()}
    while mon.poll(0):
        frames = mon.recv_multipart()
        ev = int.from_bytes(frames[0][:2], "little")
        if ev in EVENTS:
            out[EVENTS[ev]] += 1
    return out


sub, sub_mon = make(zmq.SUB, back)
pub, pub_mon = make(zmq.PUB, front)


def send(seq):
    pub.send_multipart(
        [b'"HB/py"', b'"py"', str(seq).encode(), repr(time.time()).encode()]
    )


def drain():
    n = 0
    while sub.poll(0):
        sub.recv_multipart()
        n += 1
    return n


def publish_for(seconds, seq):
    sent, got = 0, 0
    end = time.time() + seconds
    while time.time() < end:
        send(seq + sent)
        sent += 1
        time.sleep(0.02)
        got += drain()
    time.sleep(0.3)
    got += drain()
    return sent, got


# The subscription reaches the PUB through the proxy: until then a PUB drops.
warm_end = time.time() + 20
first = 0
while time.time() < warm_end and first == 0:
    send(0)
    time.sleep(0.02)
    first = drain()
before_sent, before_got = publish_for(1.0, 1)
quiet_end = time.time() + quiet
quiet_got = 0
while time.time() < quiet_end:
    time.sleep(0.05)
    quiet_got += drain()
after_sent, after_got = publish_for(1.0, 100000)
print(
    json.dumps(
        {
            "warm": first,
            "before": [before_sent, before_got],
            "quiet": quiet_got,
            "after": [after_sent, after_got],
            "sub": events(sub_mon),
            "pub": events(pub_mon),
        }
    ),
    flush=True,
)
sub.disable_monitor()
pub.disable_monitor()
ctx.destroy(linger=0)
