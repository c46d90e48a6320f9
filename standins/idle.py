"""A placeholder service: logs now and then, exits 0 on SIGTERM. Stands in for a real service
until its own stand-in exists."""

import argparse
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--name", default="service")
parser.add_argument("--every", type=float, default=30.0)
args = parser.parse_args()

stopping = False


def on_term(signum, frame):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, on_term)
print(f"{args.name}: started", flush=True)
next_log = time.monotonic() + args.every
while not stopping:
    time.sleep(0.2)
    if time.monotonic() >= next_log:
        print(f"{args.name}: alive", flush=True)
        next_log += args.every
print(f"{args.name}: stopping on SIGTERM", flush=True)
sys.exit(0)
