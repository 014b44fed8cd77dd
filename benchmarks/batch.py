"""
End-to-end throughput of one batch: a broker with default settings (SQLite,
synchronous=NORMAL, every state change committed before it is
acknowledged), two workers with one slot each, and N ``echo`` tasks
submitted with the bulk API.  Reports tasks/s from the first submit to the
last result committed, per run and the median.

    .venv/bin/python benchmarks/batch.py [--tasks 10000] [--runs 3]
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

from taskbroker.client.blocking import BlockingClient

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def start(argv, folder, ready):
    process = subprocess.Popen(argv, cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        match = re.search(ready, line)
        if match:
            return process, match
    raise SystemExit(f"benchmark: {argv[4]} exited before it was ready")


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def one_run(tasks):
    with tempfile.TemporaryDirectory() as folder:
        broker, match = start(
            [TWISTD, "--pidfile=", "-n", "taskbroker",
             "--listen", "tcp://127.0.0.1:*"],
            folder, r"listening on (\S+),")
        endpoint = match.group(1)
        workers = [start([TWISTD, "--pidfile=", "-n", "taskworker",
                          "--broker", endpoint, "--name", f"w{i}"],
                         folder, r"welcomed by broker")[0]
                   for i in range(2)]
        try:
            with BlockingClient(endpoint, timeout=30) as client:
                began = time.time()
                submitted, _ = client.submit_many(
                    [{"handler": "echo", "payload": i} for i in range(tasks)])
                last = client.wait(submitted[-1]["id"], timeout=600)
                finished = [client.wait(t["id"], timeout=600)
                            for t in submitted[-50:]]
                assert all(t["state"] == "succeeded" for t in finished)
                stats = client.stats()
                assert stats["tasks"].get("succeeded", {}).get("normal") == tasks
                done = max(datetime.fromisoformat(t["finished_at"]).timestamp()
                           for t in finished + [last])
                return tasks / (done - began)
        finally:
            for process in workers + [broker]:
                stop(process)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rates = []
    for run in range(args.runs):
        rate = one_run(args.tasks)
        rates.append(rate)
        print(f"run {run + 1}: {args.tasks} echo tasks, 2 workers x 1 slot: "
              f"{rate:,.0f} tasks/s", flush=True)
    print(f"median {statistics.median(rates):,.0f} tasks/s "
          f"(min {min(rates):,.0f}, max {max(rates):,.0f})")


if __name__ == "__main__":
    main()
