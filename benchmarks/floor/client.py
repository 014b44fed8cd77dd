"""
The floor's client: a DEALER socket to the floor broker's frontend.

Throughput: sends ``--tasks`` echo tasks at once, then collects every
result; tasks/s from the first send to the last result.  Latency:
``--latency`` tasks one at a time, each sent when the previous result has
come back; submit->start (the worker's start time) and submit->result.
Prints a ``result {json}`` line.

    python benchmarks/floor/client.py --frontend tcp://127.0.0.1:PORT \\
        --tasks 20000 --latency 1000
"""

import argparse
import json
import sys
import time

import zmq


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frontend", required=True)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--latency", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(args.frontend)
    dumps = json.JSONEncoder(separators=(",", ":")).encode

    def request(i):
        return dumps({"id": i, "handler": "echo", "payload": i}).encode()

    out = {}
    for i in range(args.warmup):
        sock.send(request(i))
        sock.recv()

    if args.tasks:
        began = time.time()
        for i in range(args.tasks):
            sock.send(request(i))
        seen = set()
        for _ in range(args.tasks):
            seen.add(json.loads(sock.recv())["id"])
        ended = time.time()
        if len(seen) != args.tasks:
            print(
                f"error: {args.tasks - len(seen)} results missing", flush=True
            )
            return 1
        out["throughput"] = args.tasks / (ended - began)
        out["throughput_seconds"] = ended - began

    start, result = [], []
    for i in range(args.latency):
        sent = time.time()
        sock.send(request(i))
        reply = json.loads(sock.recv())
        done = time.time()
        if reply["id"] != i:
            print(f"error: result {reply['id']} for task {i}", flush=True)
            return 1
        start.append(reply["started"] - sent)
        result.append(done - sent)
    out["submit_to_start"] = start
    out["submit_to_result"] = result
    print("result " + json.dumps(out), flush=True)
    sock.close()
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
