"""A long-lived reference BusClient that prints what it receives.

Lines on stdout: `session <id>` whenever its bus session id changes, and
`msg <json>` for each message. Runs until killed or RUN_SECONDS pass.
"""
import json
import os
import time

from hermes_bus.client import BusClient

c = BusClient(os.environ["NAME"], socket_path=os.environ.get("SOCK"))
c.connect()
last = None
end = time.time() + float(os.environ.get("RUN_SECONDS", "60"))
while time.time() < end:
    sid = c.bus_session_id
    if sid != last:
        print("session", sid, flush=True)
        last = sid
    for m in c.poll():
        print("msg", json.dumps(m), flush=True)
    time.sleep(0.02)
