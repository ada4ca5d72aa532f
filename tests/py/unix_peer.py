"""A reference hermes-bus client (0.3.0 or 0.7.0) driven by a Rust test.

Protocol with the test, one line on stdout each:
  ready                       after BusClient.connect()
  got <json>                  the first message received from PEER
  endpoints <json>            the list_endpoints answer
  send_missing <bool>         send_message() to a name nobody has
Then it sends {"reply_to": n} to PEER and exits after a short wait.
"""
import json
import os
import socket
import sys
import time

from hermes_bus.client import BusClient, send_message, _send_msg, _recv_msg

sock_path = os.environ["SOCK"]
name = os.environ["NAME"]
peer = os.environ["PEER"]


def say(*parts):
    print(*parts, flush=True)


c = BusClient(name, socket_path=sock_path)
if not c.connect():
    say("connect-failed")
    sys.exit(1)
say("ready")

got = None
deadline = time.time() + 20
while time.time() < deadline and got is None:
    for m in c.poll():
        if m.get("from") == peer:
            got = m
            break
    time.sleep(0.02)
if got is None:
    say("timeout")
    sys.exit(2)
say("got", json.dumps(got))

# Answer through the live client (the 0.7.0 client may be reconnecting
# after its idle-second quirk; retry until it is connected).
deadline = time.time() + 10
while time.time() < deadline and not c.send(peer, {"reply_to": got["body"]["n"], "text": "héllo ✓"}):
    time.sleep(0.05)

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sock_path)
_send_msg(s, {"type": "list_endpoints"})
say("endpoints", json.dumps(_recv_msg(s)))
s.close()

say("send_missing", json.dumps(send_message("nobody-here", {"x": 1}, socket_path=sock_path)))
time.sleep(0.3)
c.disconnect()
