"""
The floor's worker: a REQ socket that says READY, then runs every request
it gets as an ``echo`` (decode the JSON task, encode a JSON result holding
its payload and the time it started) and sends the result back, which is
also its next READY.

    python benchmarks/floor/worker.py --backend tcp://127.0.0.1:PORT
"""

import argparse
import json
import signal
import sys
import time

import zmq


class Stop(Exception):
    pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", required=True)
    args = parser.parse_args()

    def stop(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    # A time-out, so that SIGTERM is seen even when a ZeroMQ thread rather
    # than this one received it.
    sock.setsockopt(zmq.RCVTIMEO, 200)
    sock.connect(args.backend)
    sock.send(b"READY")
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    try:
        while True:
            try:
                client, empty, request = sock.recv_multipart()
            except zmq.Again:
                continue
            started = time.time()
            task = json.loads(request)
            reply = dumps(
                {
                    "id": task["id"],
                    "result": task["payload"],
                    "started": started,
                }
            )
            sock.send_multipart([client, empty, reply.encode("utf-8")])
    except Stop:
        pass
    sock.close()
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
