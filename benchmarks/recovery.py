"""
How fast work recovers from a dead process, with real daemons on their
default settings (or the heartbeat given):

- worker SIGKILL: from the kill to the task starting again on another
  worker (by the broker's started_at);
- worker SIGSTOP (a hung host: no connection drop to notice): from the
  freeze to the task starting again on another worker;
- broker SIGKILL: from the kill to a task submitted to the restarted broker
  being dispatched (the restart itself included).

    .venv/bin/python benchmarks/recovery.py [--runs 3] [--heartbeat 1.0]
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
    raise SystemExit(f"recovery: {argv[4]} exited before it was ready")


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def seconds(iso):
    return datetime.fromisoformat(iso).timestamp()


def running(client, task_id):
    while True:
        task = client.wait(task_id, timeout=0.02)
        if task["state"] == "running":
            return task


def one_run(heartbeat):
    hb = ["--heartbeat", str(heartbeat)]
    with tempfile.TemporaryDirectory() as folder:
        broker, match = start(
            [TWISTD, "--pidfile=", "-n", "taskbroker",
             "--listen", "tcp://127.0.0.1:*", *hb],
            folder, r"listening on (\S+),")
        endpoint = match.group(1)
        workers = {f"w{i}": start(
            [TWISTD, "--pidfile=", "-n", "taskworker", "--broker", endpoint,
             "--name", f"w{i}", "--grace", "0", "--concurrency", "2",
             *hb],
            folder, r"welcomed by broker")[0] for i in range(3)}
        try:
            with BlockingClient(endpoint, timeout=10) as client:
                task, _ = client.submit("sleep", {"seconds": 60})
                victim = running(client, task["id"])["worker"]
                killed = time.time()
                workers[victim].kill()
                while True:
                    again = client.wait(task["id"], timeout=0.02)
                    if again["worker"] != victim and again["state"] == "running":
                        break
                worker_recovery = seconds(again["started_at"]) - killed
                frozen = again["worker"]
                stopped = time.time()
                workers[frozen].send_signal(signal.SIGSTOP)
                while True:
                    third = client.wait(task["id"], timeout=0.02)
                    if third["worker"] != frozen and third["state"] == "running":
                        break
                freeze_recovery = seconds(third["started_at"]) - stopped
                workers[frozen].kill()
            broker.kill()
            broker.wait()
            killed = time.time()
            broker, _ = start(
                [TWISTD, "--pidfile=", "-n", "taskbroker",
                 "--listen", endpoint, *hb],
                folder, r"listening on")
            with BlockingClient(endpoint, timeout=10) as client:
                task, _ = client.submit("echo", 1)
                done = client.wait(task["id"], timeout=60)
                broker_recovery = seconds(done["started_at"]) - killed
            return worker_recovery, freeze_recovery, broker_recovery
        finally:
            for process in [*workers.values(), broker]:
                stop(process)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    args = parser.parse_args()
    results = [one_run(args.heartbeat) for _ in range(args.runs)]
    for name, values in zip(("worker SIGKILL -> task restarted elsewhere",
                             "worker SIGSTOP -> task restarted elsewhere",
                             "broker SIGKILL -> dispatch resumed"),
                            zip(*results)):
        print(f"{name}: median {statistics.median(values):.2f} s "
              f"(runs: {', '.join(f'{v:.2f}' for v in values)}; heartbeat "
              f"{args.heartbeat:g} s x 3 misses)")


if __name__ == "__main__":
    main()
