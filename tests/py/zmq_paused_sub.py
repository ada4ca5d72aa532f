"""A pyzmq SUB that pauses, for the conflation tests.

Usage: zmq_paused_sub.py ADDR GO_FILE LIVE_PREFIX LIVE_COUNT SECONDS
  Subscribes to everything, prints {"ready": true}, then reads nothing
  until GO_FILE exists (the test creates it once its burst is in the
  proxy). Then it reads envelopes until LIVE_COUNT whose topic starts with
  LIVE_PREFIX
  arrived (or SECONDS passed) and prints one line:
  {"got": n, "last": {topic: value}, "live": k, "burst_after_live": m,
   "bad": b}
  where `last` is the newest data value per topic (the data frame is a
  JSON number), `burst_after_live` counts non-live envelopes that came
  after the first live one (should be 0), and `bad` counts envelopes that
  were not 4 frames.
"""
import json
import os
import sys
import time

import zmq


def main(addr, go_file, live_prefix, live_count, seconds):
    live_count = int(live_count)
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(addr)
    print(json.dumps({"ready": True}), flush=True)
    end = time.time() + float(seconds)
    while not os.path.exists(go_file) and time.time() < end:
        time.sleep(0.01)
    got = live = after = bad = 0
    last = {}
    while live < live_count and time.time() < end:
        if not s.poll(100):
            continue
        frames = s.recv_multipart()
        if len(frames) != 4:
            bad += 1
            continue
        topic = json.loads(frames[0])
        if topic.startswith(live_prefix):
            live += 1
            continue
        if live:
            after += 1
        got += 1
        last[topic] = json.loads(frames[2])
    print(json.dumps({"got": got, "last": last, "live": live,
                      "burst_after_live": after, "bad": bad}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:6])
