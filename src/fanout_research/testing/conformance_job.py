"""The job every conformance test runs: one script whose behaviour FANOUT_TEST_MODE picks.

It is committed into a throwaway research repo and run by the backend under test, exactly as a
trainer would be, so it uses nothing but the standard library.
"""

import json
import os
import sys
import time

mode = os.environ.get("FANOUT_TEST_MODE", "ok")
sleep_s = float(os.environ.get("FANOUT_TEST_SLEEP", "0"))
print(f"job-start pid={os.getpid()} mode={mode}", flush=True)


def summary(val_bpb: float) -> None:
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print("training_seconds: 1.5")
    print("peak_vram_mb:     0.0")
    print("num_steps:        42")
    print("depth:            2", flush=True)


if mode == "ok":
    time.sleep(sleep_s)
    summary(1.234567)
elif mode == "json":
    summary(2.0)
    print("fanout-result " + json.dumps({"val_bpb": 1.5, "profile": "conformance"}), flush=True)
elif mode == "crash":
    print("about to fail", flush=True)
    print("boom: deliberate crash", file=sys.stderr, flush=True)
    sys.exit(3)
elif mode == "nometric":
    print("finished without reporting anything useful", flush=True)
elif mode == "hang":
    while True:
        time.sleep(0.1)
elif mode == "env":
    for name in ("FANOUT_JOB_NAME", "FANOUT_TIME_BUDGET_S", "FANOUT_TEST_EXTRA"):
        print(f"env {name}={os.environ.get(name, '<unset>')}")
    secret = os.environ.get("FANOUT_CONFORMANCE_SECRET")
    print("secret-visible" if secret else "secret-hidden")
    summary(1.0)
elif mode == "marker":
    with open("marker.txt") as handle:
        print(f"marker={handle.read().strip()}")
    summary(1.0)
else:
    sys.exit(f"unknown FANOUT_TEST_MODE {mode!r}")
