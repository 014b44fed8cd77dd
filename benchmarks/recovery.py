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
import signal
import statistics
import tempfile
import time
from datetime import datetime

from taskbroker import _daemons
from taskbroker.client.blocking import BlockingClient


def start(command, args, folder, ready, name):
    daemon = _daemons.Daemon(name, _daemons.twistd(command, *args), folder)
    try:
        return daemon, daemon.wait_for(ready)
    except _daemons.DaemonError as e:
        _daemons.stop_all([daemon])
        raise SystemExit(f"recovery: {e}") from None


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
            "taskbroker",
            ["--listen", "tcp://127.0.0.1:*", *hb],
            folder,
            r"listening on (\S+),",
            "broker",
        )
        endpoint = match.group(1)
        workers = {
            f"w{i}": start(
                "taskworker",
                [
                    "--broker",
                    endpoint,
                    "--name",
                    f"w{i}",
                    "--grace",
                    "0",
                    "--concurrency",
                    "2",
                    *hb,
                ],
                folder,
                r"welcomed by broker",
                f"w{i}",
            )[0]
            for i in range(3)
        }
        try:
            with BlockingClient(endpoint, timeout=10) as client:
                task, _ = client.submit("sleep", {"seconds": 60})
                victim = running(client, task["id"])["worker"]
                killed = time.time()
                workers[victim].signal(signal.SIGKILL)
                while True:
                    again = client.wait(task["id"], timeout=0.02)
                    if (
                        again["worker"] != victim
                        and again["state"] == "running"
                    ):
                        break
                worker_recovery = seconds(again["started_at"]) - killed
                frozen = again["worker"]
                stopped = time.time()
                workers[frozen].signal(signal.SIGSTOP)
                while True:
                    third = client.wait(task["id"], timeout=0.02)
                    if (
                        third["worker"] != frozen
                        and third["state"] == "running"
                    ):
                        break
                freeze_recovery = seconds(third["started_at"]) - stopped
                workers[frozen].signal(signal.SIGKILL)
            broker.signal(signal.SIGKILL)
            broker.wait_exit()
            killed = time.time()
            broker, _ = start(
                "taskbroker",
                ["--listen", endpoint, *hb],
                folder,
                r"listening on",
                "broker",
            )
            with BlockingClient(endpoint, timeout=10) as client:
                task, _ = client.submit("echo", 1)
                done = client.wait(task["id"], timeout=60)
                broker_recovery = seconds(done["started_at"]) - killed
            return worker_recovery, freeze_recovery, broker_recovery
        finally:
            _daemons.stop_all([*workers.values(), broker])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    args = parser.parse_args()
    results = [one_run(args.heartbeat) for _ in range(args.runs)]
    for name, values in zip(
        (
            "worker SIGKILL -> task restarted elsewhere",
            "worker SIGSTOP -> task restarted elsewhere",
            "broker SIGKILL -> dispatch resumed",
        ),
        zip(*results),
    ):
        print(
            f"{name}: median {statistics.median(values):.2f} s "
            f"(runs: {', '.join(f'{v:.2f}' for v in values)}; heartbeat "
            f"{args.heartbeat:g} s x 3 misses)"
        )


if __name__ == "__main__":
    main()
