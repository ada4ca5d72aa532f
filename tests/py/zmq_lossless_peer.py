"""A slow pyzmq SUB for the lossless-proxy tests.

Usage: zmq_lossless_peer.py slow-sub ADDR COUNT SECONDS EVERY PAUSE_MS IDLE_MS [HOLD_MS]
  Subscribes to everything, prints {"ready": true}, then receives hermes
  envelopes whose data frame is [seq, ...], sleeping PAUSE_MS after every
  EVERY messages (a slow reader that still makes progress), and HOLD_MS
  once after the first message (a reader that stalls a while). Stops after
  COUNT messages, after SECONDS in all, or IDLE_MS without a message once
  one arrived; then prints one summary line:
  {"got": n, "first": seq, "last": seq, "gaps": n, "disorder": n, "bad": n,
   "maxgap_s": s}
  where gaps counts seq != previous + 1, disorder counts seq <= previous,
  and maxgap_s is the longest wait between two messages (for diagnosis).
"""
import json
import sys
import time

import zmq


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def seq_of(data):
    # data is b"[123,..." : the number is between "[" and the first ",".
    return int(data[1 : data.index(b",")])


def slow_sub(addr, count, seconds, every, pause_ms, idle_ms, hold_ms="0"):
    count, every = int(count), max(1, int(every))
    hold = float(hold_ms) / 1000.0
    pause, idle_ms = float(pause_ms) / 1000.0, int(idle_ms)
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    # A fixed, modest kernel receive buffer. With Linux autotuning it can
    # grow to tens of MB, and a zero TCP window reopens only after the
    # reader freed a sixteenth of it: a slow reader would then accept
    # nothing new for seconds while it works through its backlog, and a
    # short slow-consumer timeout in the proxy would take it for stuck.
    s.setsockopt(zmq.RCVBUF, 256 * 1024)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(addr)
    out({"ready": True})
    end = time.time() + float(seconds)
    got = gaps = disorder = bad = 0
    first = last = None
    maxgap, prev = 0.0, time.time()
    while got < count and time.time() < end:
        try:
            frames = s.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            if not s.poll(idle_ms if got else 100) and got:
                break
            continue
        now = time.time()
        if got and now - prev > maxgap:
            maxgap = now - prev
        prev = now
        try:
            seq = seq_of(frames[2])
        except (IndexError, ValueError):
            bad += 1
            continue
        if first is None:
            first = seq
        elif seq != last + 1:
            gaps += 1
            if seq <= last:
                disorder += 1
        last = seq
        got += 1
        if got == 1 and hold:
            time.sleep(hold)
            prev = time.time()
        if got % every == 0:
            time.sleep(pause)
    out({"got": got, "first": first, "last": last, "gaps": gaps,
         "disorder": disorder, "bad": bad, "maxgap_s": round(maxgap, 3)})
    s.close(0)
    ctx.term()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    {"slow-sub": slow_sub}[mode](*args)
