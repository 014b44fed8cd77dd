"""
The floor's broker: the ZeroMQ guide's load-balancing broker ("lbbroker"),
in Python with pyzmq, with no storage at all.

Clients connect DEALER sockets to the frontend ROUTER and send one frame,
the request; workers connect REQ sockets to the backend ROUTER and say
READY.  Each worker reply carries the result back to its client and counts
as the worker's next READY: one task per READY, as in the guide.  Unlike
the guide, requests that arrive while no worker is free wait in an
in-memory queue rather than in ZeroMQ's buffers, so a client may send all
its tasks at once.

Prints ``frontend ENDPOINT backend ENDPOINT``, then ``workers N`` each
time a new worker says READY.

    python benchmarks/floor/broker.py
"""

import signal
import sys
from collections import deque

import zmq


class Stop(Exception):
    pass


def main():
    def stop(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    context = zmq.Context()
    frontend = context.socket(zmq.ROUTER)
    backend = context.socket(zmq.ROUTER)
    for sock in (frontend, backend):
        sock.setsockopt(zmq.LINGER, 0)
        # No high-water mark: a ROUTER drops what it cannot queue.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind("tcp://127.0.0.1:*")
    front = frontend.getsockopt(zmq.LAST_ENDPOINT).decode()
    back = backend.getsockopt(zmq.LAST_ENDPOINT).decode()
    print(f"frontend {front} backend {back}", flush=True)

    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    workers = deque()
    known = set()
    tasks = deque()
    try:
        while True:
            # A time-out, so that SIGTERM is seen even when a ZeroMQ
            # thread rather than this one received it.
            events = dict(poller.poll(200))
            if backend in events:
                # Drain what is there; asking is cheaper than the
                # exception an empty read raises.
                while backend.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    frames = backend.recv_multipart()
                    # [worker, b"", b"READY"] or [worker, b"", client, b"", reply]
                    worker = frames[0]
                    workers.append(worker)
                    if len(frames) == 5:
                        frontend.send_multipart([frames[2], frames[4]])
                    elif worker not in known:
                        known.add(worker)
                        print(f"workers {len(known)}", flush=True)
            if frontend in events:
                while frontend.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    tasks.append(frontend.recv_multipart())
            while tasks and workers:
                client, request = tasks.popleft()
                backend.send_multipart(
                    [workers.popleft(), b"", client, b"", request]
                )
    except Stop:
        pass
    frontend.close()
    backend.close()
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
