"""
A TCP proxy that a test can sever and restore, to cut a daemon off from
a server (PostgreSQL) without touching the server that others share.
"""

import socket
import threading


class Proxy:
    """
    Listens on a free loopback port and forwards each connection to
    ``(host, port)``.  :meth:`sever` drops every connection and makes new
    ones fail at once (as a server that went away would); :meth:`restore`
    lets them through again.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, host, port, record=False):
        """
        :param record: keep every byte that passes, both ways, in
            :attr:`recorded` (a ``bytearray``), for a test that looks at
            what travels on the wire.
        """
        self._target = (host, port)
        self.recorded = bytearray() if record else None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open = []
        self._severed = False
        self._closed = False
        self.connections = 0
        threading.Thread(
            target=self._accept, daemon=True, name="test-proxy"
        ).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def sever(self):
        with self._lock:
            self._severed = True
            sockets, self._open = self._open, []
        for s in sockets:
            _close(s)

    def restore(self):
        with self._lock:
            self._severed = False

    def close(self):
        self._closed = True
        self.sever()
        _close(self._listener)

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                severed = self._severed
            if severed:
                _close(client)
                continue
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._open += [client, server]
                self.connections += 1
            for a, b in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump,
                    args=(a, b),
                    daemon=True,
                    name="test-proxy-pump",
                ).start()

    def _pump(self, source, sink):
        _pump(source, sink, self.recorded, self._lock)


def _pump(source, sink, recorded=None, lock=None):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            if recorded is not None:
                with lock:
                    recorded += data
            sink.sendall(data)
    except OSError:
        pass
    _close(source)
    _close(sink)


def _close(s):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
