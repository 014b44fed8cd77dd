# -*- test-case-name: tests.unit.test_broker_service -*-
"""
The broker daemon as a tree of services (:mod:`taskbroker.services`),
started in this order and stopped in reverse:

1. ``store``: open the database (take ownership, create or upgrade the
   schema); at the end, close it, which waits for in-flight writes;
2. ``core``: load the running attempts and a window of each queue, before
   any message can arrive;
3. ``zmq``: the ZeroMQ context; at the end, shut it down;
4. ``socket``: bind the ROUTER socket; at the end, close it;
5. ``intake``: at the end, stop handling messages and tell waiting
   clients, while the socket can still send;
6. ``poller``, ``sweeper`` and ``recounter``: the timers that adopt
   SQL-inserted tasks, send heartbeats, and count the tasks table again
   (the first count starts as the broker listens; stopping a timer waits
   for its tick under way).

So the socket binds only after the store is open and loaded, and at the
end the intake closes before the store drains.  A web service would be one
more child.

Once it listens, the broker has the store check its database for damage
(``--check-database``), in the background.  If the store is lost (its
database removed, replaced or found damaged), the broker stops with one
critical line and exits 1 (:meth:`ServiceTree.fail
<taskbroker.services.ServiceTree.fail>`).
"""

import socket
import time

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger

from taskbroker.broker.bulk import RETENTION_INTERVAL
from taskbroker.broker.core import Broker
from taskbroker.broker.http import StatusSite, is_loopback, load_token
from taskbroker.broker.keys import reachable_from_afar
from taskbroker.broker.router import BAD_MESSAGE_LOG_INTERVAL, RateLimit
from taskbroker.broker.schedules import SCHEDULE_INTERVAL
from taskbroker.broker.status import RECOUNT_INTERVAL
from taskbroker.config import DEFAULT_HTTP
from taskbroker.errors import ConfigError, StoreLost, one_line
from taskbroker.protocol.codec import MAX_MESSAGE_SIZE
from taskbroker.services import ServiceTree, StepService
from taskbroker.store import describe_database
from taskbroker.transport.zap import (
    ZAP_ENDPOINT,
    HandshakeMonitor,
    ZapHandler,
)
from taskbroker.transport.zmq import RouterSocket, ZmqFactoryService

log = Logger()


class BrokerService(ServiceTree):
    """
    A running broker.

    :param config: a :class:`taskbroker.config.BrokerConfig`.
    :param store: an unopened :class:`taskbroker.interfaces.ITaskStore`.
    :param reactor: the reactor (``IReactorTime`` and ``IReactorCore``).
    :param on_fatal: called with a one-line message when the broker cannot
        start; the daemon's tap logs it and exits non-zero.
    :param monotonic: seconds on a clock that never steps, for liveness;
        default :func:`time.monotonic`.

    :ivar broker: the :class:`taskbroker.broker.core.Broker`.
    :ivar socket: the bound :class:`~taskbroker.transport.zmq.RouterSocket`
        while running, else ``None``.
    """

    def __init__(
        self,
        config,
        store,
        reactor,
        on_fatal=None,
        monotonic=time.monotonic,
        curve=None,
    ):
        ServiceTree.__init__(self, on_started=self._ready, on_fatal=on_fatal)
        self.setName("taskbroker")
        self.config = config
        self.store = store
        self.reactor = reactor
        self.socket = None
        #: The HTTP status site's listening port, or ``None``.
        self.http_port = None
        # (keypair, peer keys or None), from taskbroker.broker.keys.load.
        self._curve = curve
        self._zap = None
        self._handshakes = None
        self._refusals = RateLimit(BAD_MESSAGE_LOG_INTERVAL, monotonic)
        # What the last reload of the authorization folders said was
        # wrong, so that it is logged once, not at every reload.
        self._key_problems = set()
        self.broker = Broker(
            config, store, reactor, self._send, monotonic=monotonic
        )
        self._zmq = ZmqFactoryService(reactor)
        self._zmq.setName("zmq")
        for child in (
            StepService("store", self._open_store, store.close),
            StepService("core", self.broker.load, self.broker.claims.stop),
            self._zmq,
            StepService("socket", self._bind, self._close),
            StepService("http", self._listen_http, self._stop_http),
            StepService("intake", stop=self.broker.stop),
            self._timer("poller", config.poll_interval, self.broker.poll),
            self._timer("sweeper", config.heartbeat, self._sweep),
            # Its first count starts as soon as the broker listens.
            self._timer("recounter", RECOUNT_INTERVAL, self._recount),
            self._timer("scheduler", SCHEDULE_INTERVAL, self._schedule),
            self._timer("retention", RETENTION_INTERVAL, self._retain),
        ):
            child.setServiceParent(self)
        if curve is not None and curve[1] is not None:
            self._timer(
                "keys", KEYS_RELOAD_INTERVAL, self.reload_keys
            ).setServiceParent(self)
        if self.broker.claims.lease is not None:
            # Renewed every second, or three times a lease if that is
            # shorter, so that one late renewal does not lose the claims.
            self._timer(
                "claims",
                min(1.0, self.broker.claims.lease / 3),
                self._keep_claims,
            ).setServiceParent(self)

    def _timer(self, name, interval, call):
        timer = TimerService(interval, _guarded(call, name))
        timer.clock = self.reactor
        timer.setName(name)
        return timer

    def _open_store(self):
        return self.store.open().addCallback(self._watch_store)

    def _watch_store(self, _):
        # Not returned: it fires only if the database is lost.
        self.store.when_lost().addCallback(self.fail)

    def _check_database(self):
        if self.config.check_database == "none":
            return
        self.store.check().addErrback(self._check_failed)

    def _check_failed(self, reason):
        # A damaged database is lost, and when_lost stops the broker; a
        # check interrupted by a stop needs no word.
        if reason.check(StoreLost) or not self.running:
            return
        log.warn(
            "the database could not be checked: {error}",
            error=one_line(reason.value),
        )

    def _bind(self):
        factory = self._zmq.get_factory()
        keypair = None
        if self._curve is not None:
            keypair, keys = self._curve
            self.broker.peer_keys = keys
            if keys is not None:
                self._note_key_problems(keys.problems)
            # Before the socket: where no ZAP handler answers, libzmq lets
            # every key in.
            try:
                self._zap = ZapHandler(factory, self._refusal, self._refused)
            except Exception as e:
                raise OSError(
                    "cannot serve CURVE authentication (ZAP handler at "
                    f"{ZAP_ENDPOINT}): {e}; without it any key would get "
                    "in"
                ) from None
        try:
            self.socket = RouterSocket(
                factory,
                self.config.listen,
                self.broker.handle,
                MAX_MESSAGE_SIZE,
                curve=keypair,
            )
        except Exception as e:
            raise OSError(
                f"cannot listen on {self.config.listen}: {e}"
            ) from None
        if keypair is not None:
            self._handshakes = HandshakeMonitor(
                factory, self.socket.zmq_socket, self._handshake_failed
            )

    def _listen_http(self):
        """
        Serve the status site (``--http``).  A failure to listen is fatal,
        but for the default endpoint: a second broker on one host finds
        its port taken, and only says so.
        """
        from twisted.internet.endpoints import serverFromString
        from twisted.web.server import Site

        if self.config.http is None:
            return None
        token = load_token(self.config.http_token_file)
        site = StatusSite(self.broker, token, loopback=True, open_reads=False)
        endpoint = serverFromString(self.reactor, self.config.http)

        def listening(port):
            self.http_port = port
            address = port.getHost()
            host = getattr(address, "host", None)
            site.loopback = host is None or is_loopback(host)
            site.open_reads = site.loopback and self._curve is None
            shown = socket.getfqdn() if host in ("0.0.0.0", "::") else host
            if host is None:
                where = f"unix socket {address.name}"
            else:
                where = (
                    "http://"
                    + (f"[{shown}]" if ":" in shown else shown)
                    + f":{address.port}/"
                )
            if self.config.http_token_file is None:
                log.info(
                    "status site at {url}?token={token}",
                    url=where,
                    token=token,
                )
            else:
                log.info(
                    "status site at {url} (its token is in {path})",
                    url=where,
                    path=self.config.http_token_file,
                )

        def failed(reason):
            error = one_line(reason.value)
            if self.config.http != DEFAULT_HTTP:
                raise OSError(
                    f"cannot serve --http {self.config.http}: {error}"
                )
            log.warn(
                "no status site: cannot listen on {endpoint} "
                "({error}; another broker on this host?); give --http "
                "another endpoint, or none",
                endpoint=self.config.http,
                error=error,
            )

        return defer.maybeDeferred(endpoint.listen, Site(site)).addCallbacks(
            listening, failed
        )

    def _stop_http(self):
        port, self.http_port = self.http_port, None
        if port is not None:
            return port.stopListening()
        return None

    def _refusal(self, key):
        """
        ZAP: why a key may not connect, or ``None``.
        """
        keys = self.broker.peer_keys
        if keys is not None and not keys.admits(key):
            return "a key not authorized"
        return None

    def reload_keys(self):
        """
        Read the authorization folders again (every few seconds, and on
        ``SIGHUP``): a key added may connect at once, a key removed is
        refused at its next message.
        """
        keys = self.broker.peer_keys
        if keys is None:
            return
        before = keys.snapshot()
        try:
            problems = keys.reload()
        except ConfigError as e:
            self._note_key_problems([f"{e}; the keys stay as they were"])
            return
        changes = keys.changes(before)
        if changes:
            log.info("authorized keys changed: {changes}", changes=changes)
            self._refuse_revoked_workers(keys, before[0])
        self._note_key_problems(problems)

    def _refuse_revoked_workers(self, keys, named):
        """
        A worker whose key was removed gets no more tasks: it is told to
        stop (fatal), and its tasks are requeued, without waiting for its
        next message.
        """
        workers = self.broker.workers
        for session in list(self.broker.sessions):
            if session.key is not None and not keys.may_work(session.key):
                log.warn(
                    "worker {name}: its key {key} ({key_name}) was "
                    "removed; refusing it",
                    name=session.name,
                    key=session.key.decode("ascii"),
                    key_name=named.get(session.key, "?"),
                )
                workers.forget(session)
                workers.refuse(
                    session.identity,
                    "forbidden",
                    "this key may not act as a worker on this broker",
                )

    def _note_key_problems(self, problems):
        for problem in sorted(set(problems) - self._key_problems):
            log.warn("authorized keys: {problem}", problem=problem)
        self._key_problems = set(problems)

    def _refused(self, key, reason, address):
        self.broker.counters["refused_keys"] += 1
        if self._refusals.allow(key):
            keys = self.broker.peer_keys
            shown = keys.name(key) if keys is not None else key
            log.warn(
                "refused a connection from {address}: {reason}, "
                "{key} (further refusals of this key are counted, not "
                "logged, for {interval:.0f}s)",
                address=address,
                reason=reason,
                key=shown,
                interval=BAD_MESSAGE_LOG_INTERVAL,
            )

    def _handshake_failed(self, reason):
        # libzmq does not say from where: the event names the broker's
        # own endpoint.
        self.broker.counters["refused_keys"] += 1
        if self._refusals.allow(reason):
            log.warn(
                "refused a connection that failed the CURVE "
                "handshake: {reason} (further ones are counted, not "
                "logged, for {interval:.0f}s)",
                reason=reason,
                interval=BAD_MESSAGE_LOG_INTERVAL,
            )

    def _close(self):
        if self._handshakes is not None:
            handshakes, self._handshakes = self._handshakes, None
            handshakes.close()
        if self.socket is not None:
            socket, self.socket = self.socket, None
            socket.close()
        if self._zap is not None:
            zap, self._zap = self._zap, None
            zap.close()

    def _ready(self):
        _raise_descriptor_limit()
        if self._curve is None and reachable_from_afar(self.socket.endpoint):
            log.warn(
                "listening on {endpoint} WITHOUT CURVE: anyone who can reach "
                "it can submit and read every task, and register as a "
                "worker to be sent them; give --curve-secret-key (see "
                "docs/security.rst), bind a loopback address, or refuse "
                "this with --require-curve",
                endpoint=self.socket.endpoint,
            )
        log.info(
            "taskbroker ready: listening on {endpoint}, database {database}, "
            "levels {levels}, instance {instance}",
            endpoint=self.socket.endpoint,
            database=describe_database(self.config.database),
            levels=",".join(self.config.priorities),
            instance=self.broker.instance_id,
        )
        self._check_database()

    def _sweep(self):
        # A heartbeat to every worker: one look for input after them all,
        # not one after each.
        with self.socket.batch():
            self.broker.sweep()

    def _keep_claims(self):
        # Paused: a broker that cannot renew may lose its claims, and says
        # so once, not at every tick.
        return self.broker.keep_claims().addErrback(
            self.broker.trouble, "renewing claims", pause=True
        )

    def _schedule(self):
        return self.broker.schedules.tick().addErrback(
            self.broker.trouble, "enqueueing periodic tasks"
        )

    def _retain(self):
        return self.broker.bulk.retain().addErrback(
            self.broker.trouble, "deleting old finished tasks"
        )

    def _recount(self):
        return self.broker.status.recount().addErrback(
            self.broker.trouble, "counting tasks"
        )

    def _send(self, identity, frames):
        if self.socket is None:
            return False
        return self.socket.send(identity, frames)

    @property
    def endpoint(self):
        """
        The endpoint bound (with the port filled in), once started.
        """
        return self.socket.endpoint if self.socket is not None else None


#: Seconds between reads of the authorization folders (CURVE).
KEYS_RELOAD_INTERVAL = 2.0
#: Fewer descriptors than this and the broker warns at start.
LOW_DESCRIPTOR_LIMIT = 4096
#: The broker raises its soft descriptor limit towards its hard limit, up
#: to this many.
MAX_DESCRIPTORS = 1_048_576


def _raise_descriptor_limit():
    """
    Each worker and client connection takes a descriptor, and a broker out
    of them can accept nobody (libzmq then retries the accept in a busy
    loop): raise the soft limit to the hard one, as servers do, say how
    many the broker may have, and warn when that is few.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = (
        MAX_DESCRIPTORS
        if hard == resource.RLIM_INFINITY
        else min(hard, MAX_DESCRIPTORS)
    )
    raised_from = None
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass
        else:
            raised_from, soft = soft, wanted
    if soft != resource.RLIM_INFINITY and soft < LOW_DESCRIPTOR_LIMIT:
        log.warn(
            "file descriptors: at most {limit}, which caps the workers "
            "and clients that can connect; raise it (LimitNOFILE= in "
            "a systemd unit, ulimit -n in a shell)",
            limit=soft,
        )
    elif raised_from is not None:
        log.info(
            "file descriptors: at most {limit} (raised from {raised_from})",
            limit=soft,
            raised_from=raised_from,
        )
    else:
        log.info("file descriptors: at most {limit}", limit=soft)


def _guarded(call, name):
    """
    ``call`` for a timer, such that a bug in one tick is logged and the
    timer goes on: a ``TimerService`` whose call raises stops for good,
    and a broker whose sweeper stopped would lose every worker.
    """

    def tick():
        try:
            d = call()
        except Exception:
            log.failure("internal error in the {name}", name=name)
            return None
        if d is not None:
            d.addErrback(
                lambda f: log.failure(
                    "internal error in the {name}", f, name=name
                )
            )
        return d

    return tick
