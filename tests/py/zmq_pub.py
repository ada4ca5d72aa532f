"""A raw pyzmq PUB (libzmq) for the demand tests.

Usage: zmq_pub.py ADDR SECONDS TOPIC...
Connects to the proxy's XSUB address ADDR, prints {"ready": true}, then
every 5 ms sends one hermes envelope per TOPIC (4 JSON frames: topic,
origin "pyzmq", data {"seq": n}, ts), for SECONDS; every 50 rounds prints
{"rounds": n}. libzmq drops at the source what no subscription matches.
"""
import json
import sys
import time

import zmq


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(addr, seconds, *topics):
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(addr)
    out({"ready": True})
    end = time.time() + float(seconds)
    n = 0
    while time.time() < end:
        for t in topics:
            s.send_multipart(
                [
                    json.dumps(t).encode(),
                    json.dumps("pyzmq").encode(),
                    json.dumps({"seq": n}).encode(),
                    json.dumps(time.time()).encode(),
                ]
            )
        n += 1
        if n % 50 == 0:
            out({"rounds": n})
        time.sleep(0.005)
    s.close()
    ctx.term()


if __name__ == "__main__":
    main(*sys.argv[1:])
