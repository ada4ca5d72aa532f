"""A reference hermes-bus client (0.3.0 or 0.7.0) for the flow-control tests.

  flow_peer.py sink NAME TOTAL DEADLINE_S
      registers NAME, prints "ready", then poll()s in a loop until TOTAL
      messages arrived (or the deadline passed) and prints one JSON line:
      {"total": n, "per_src": {src: count}, "out_of_order": k}
  flow_peer.py source NAME TO COUNT
      registers NAME, send()s COUNT messages {"src": NAME, "n": i} to TO as
      fast as send() returns, and prints {"sent": COUNT, "true": t}.
The socket path comes from SOCK.
"""
import json
import os
import sys
import time

from hermes_bus.client import BusClient

sock = os.environ["SOCK"]
mode, name = sys.argv[1], sys.argv[2]

c = BusClient(name, socket_path=sock)
if not c.connect():
    print(json.dumps({"error": "connect failed"}), flush=True)
    sys.exit(1)

if mode == "sink":
    total, deadline = int(sys.argv[3]), time.time() + float(sys.argv[4])
    print("ready", flush=True)
    got, last, disorder = 0, {}, 0
    while got < total and time.time() < deadline:
        batch = c.poll()
        if not batch:
            time.sleep(0.001)
            continue
        for m in batch:
            body = m.get("body") or {}
            src, n = body.get("src"), body.get("n")
            if src is None:
                continue
            if n != last.get(src, -1) + 1:
                disorder += 1
            last[src] = n
            got += 1
    per = {k: v + 1 for k, v in last.items()}
    print(json.dumps({"total": got, "per_src": per, "out_of_order": disorder}), flush=True)
else:
    to, count = sys.argv[3], int(sys.argv[4])
    true = 0
    for i in range(count):
        if c.send(to, {"src": name, "n": i}):
            true += 1
    print(json.dumps({"sent": count, "true": true}), flush=True)
    # Give the bus a moment to read the tail before the socket closes.
    time.sleep(0.2)
c.disconnect()
