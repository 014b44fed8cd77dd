# -*- test-case-name: tests.unit.test_sessions -*-
"""
The connected workers: one :class:`Session` per announced connection, and
the :class:`Sessions` registry that finds them by route and by name and
tells which have gone silent.

Pure bookkeeping: times are passed in, nothing is sent from here.
"""


class Session:
    """
    A connected worker, from its HELLO until it leaves or is lost.

    :ivar identity: its route on the ROUTER socket.
    :ivar name: the name it announced, unique among live sessions.
    :ivar levels: the level names it serves, most urgent first.
    :ivar handlers: the handler names it has.
    :ivar slots: how many tasks it runs at once.
    :ivar heartbeat: its heartbeat interval, in seconds.
    :ivar connected_since: the Unix time of its first HELLO.
    :ivar last_seen: the Unix time of its latest message.
    :ivar seen_at: the same on a monotonic clock: liveness is judged on
        it, so that a wall-clock step does not expire every worker at once.
    :ivar running: task id -> token of the attempts it holds.
    :ivar sent_at: task id -> monotonic time its TASK was sent, until the
        worker confirms it in a heartbeat.
    :ivar adopting: task id -> token of the attempts it brought from
        another broker, while this one asks the store for them.
    :ivar key: with CURVE, the public key it authenticated with (Z85
        ``bytes``), else ``None``.
    :ivar version: the taskbroker version its HELLO gave, or ``None``.
    """

    __slots__ = (
        "identity",
        "name",
        "levels",
        "handlers",
        "slots",
        "heartbeat",
        "connected_since",
        "last_seen",
        "seen_at",
        "running",
        "sent_at",
        "adopting",
        "key",
        "version",
    )

    def __init__(
        self,
        identity,
        name,
        levels,
        handlers,
        slots,
        heartbeat,
        now,
        monotonic_now,
    ):
        self.identity = identity
        self.name = name
        self.levels = levels
        self.handlers = handlers
        self.slots = slots
        self.heartbeat = heartbeat
        self.connected_since = now
        self.last_seen = now
        self.seen_at = monotonic_now
        self.running = {}
        self.sent_at = {}
        self.adopting = {}
        self.key = None
        self.version = None

    def __repr__(self):
        return f"<Session {self.name!r} {self.identity!r}>"


class Sessions:
    """
    The live sessions, by route and by name.
    """

    def __init__(self):
        self._by_identity = {}
        self._by_name = {}

    def __len__(self):
        return len(self._by_identity)

    def __iter__(self):
        return iter(list(self._by_identity.values()))

    def __contains__(self, identity):
        return identity in self._by_identity

    def get(self, identity):
        """
        :returns: the live :class:`Session` on route ``identity``, or
            ``None``.
        """
        return self._by_identity.get(identity)

    def is_current(self, session):
        """
        Whether ``session`` is still the live session on its route (not
        lost, and not replaced by a new HELLO).
        """
        return self._by_identity.get(session.identity) is session

    def holder_of(self, name):
        """
        :returns: the live :class:`Session` named ``name``, or ``None``.
        """
        identity = self._by_name.get(name)
        return (
            self._by_identity.get(identity) if identity is not None else None
        )

    def add(self, session):
        """
        Register ``session``, replacing any session on its route.
        """
        self._by_identity[session.identity] = session
        self._by_name[session.name] = session.identity

    def remove(self, session):
        """
        Forget ``session`` (it left or was lost).
        """
        if self._by_identity.get(session.identity) is session:
            del self._by_identity[session.identity]
        if self._by_name.get(session.name) == session.identity:
            del self._by_name[session.name]

    def silent(self, now, misses):
        """
        :param now: the monotonic time.
        :param misses: how many of its heartbeats a session may miss.
        :returns: a ``list`` of the sessions silent for longer than
            ``misses`` of their heartbeat intervals.
        """
        return [
            s
            for s in self._by_identity.values()
            if now - s.seen_at > s.heartbeat * misses
        ]

    def total_slots(self):
        return sum(s.slots for s in self._by_identity.values())
