# -*- test-case-name: tests.unit.test_broker_schedules -*-
"""
Periodic tasks: the requests that add, list, pause, resume and remove
schedules, and the timer that enqueues the ticks that came due.

Schedules live in the database, so every broker on it sees them and any
of them may enqueue a tick; the store's compare-and-set on the schedule's
``next_tick`` (:meth:`taskbroker.interfaces.ITaskStore.fire_schedule`)
makes each tick enqueued once.  Under CURVE with client checks, only
admin keys may change or read schedules: a schedule's tasks run with no
client's limits.
"""

from twisted.internet import defer
from twisted.logger import Logger

from taskbroker.broker.requests import Refused, is_admin, submitter_of
from taskbroker.broker.router import RateLimit
from taskbroker.errors import one_line
from taskbroker.protocol import codec
from taskbroker.protocol.codec import dumps
from taskbroker.protocol.objects import schedule_object
from taskbroker.schedules import next_tick, unique_key
from taskbroker.store import NewTask, ScheduleRow

#: Seconds between looks for schedules that came due: a tick is enqueued
#: within about this long of its time.
SCHEDULE_INTERVAL = 1.0
#: The most schedules handled in one look; more wait for the next.
DUE_BATCH = 100
#: Seconds between two warnings about the same broken schedule.
WARN_INTERVAL = 300.0


class Schedules:
    """
    The schedule requests, and the ticks.

    :param broker: the :class:`taskbroker.broker.core.Broker` this belongs
        to.
    """

    log = Logger()

    def __init__(self, broker):
        self._broker = broker
        self._warnings = RateLimit(WARN_INTERVAL, broker.monotonic)
        # The schedules whose ticks this broker is skipping.
        self._skipping = set()

    # -- requests ------------------------------------------------------------

    def _admin(self, key, doing):
        """
        :raises Refused: ``forbidden`` unless ``key`` may do anything.
        """
        if not is_admin(self._broker, key):
            raise Refused(
                "forbidden", f"{doing} needs an admin key (--admin-clients)"
            )

    def on_SCHEDULE_ADD(self, identity, body, key=None):
        return self._broker.requests.carry_out(
            self.add, identity, body, key, "adding a schedule"
        )

    def on_SCHEDULE_LIST(self, identity, body, key=None):
        return self._broker.requests.carry_out(
            self.list, identity, body, key, "listing schedules"
        )

    def on_SCHEDULE_REMOVE(self, identity, body, key=None):
        return self._broker.requests.carry_out(
            self.remove, identity, body, key, "removing a schedule"
        )

    def on_SCHEDULE_PAUSE(self, identity, body, key=None):
        return self._broker.requests.carry_out(
            self.pause, identity, body, key, "pausing a schedule"
        )

    def on_SCHEDULE_RESUME(self, identity, body, key=None):
        return self._broker.requests.carry_out(
            self.resume, identity, body, key, "resuming a schedule"
        )

    def add(self, body, key):
        """
        Add a schedule (a SCHEDULE_ADD's body, as the codec checked it).

        :returns: a ``Deferred`` firing with the reply's body, or failing
            with :class:`Refused` (``exists``, ``bad_schedule``,
            ``unknown_priority``, ``forbidden``) or the store's error.
        """
        self._admin(key, "adding a schedule")
        row = self.new_row(body, key)
        store = self._broker.store

        def added(created):
            if not created:
                raise Refused(
                    "exists",
                    f"a schedule named {row.name!r} "
                    "exists; remove it first, or replace it",
                )
            self.log.info(
                "schedule {name} added: {handler} {timing}, next at {next}",
                name=row.name,
                handler=row.handler,
                timing=describe_timing(row),
                next=schedule_object(row)["next_tick"],
            )
            return {"schedule": schedule_object(row)}

        return store.add_schedule(row, bool(body.get("replace"))).addCallback(
            added
        )

    def new_row(self, body, key):
        """
        The schedule a SCHEDULE_ADD asks for, its first tick the first
        after now.

        :raises Refused: for a schedule the broker cannot keep.
        """
        broker = self._broker
        every, cron = body.get("every"), body.get("cron")
        timezone = body.get("timezone") or "UTC"
        if (every is None) == (cron is None):
            raise Refused(
                "bad_schedule",
                "a schedule has 'every' or 'cron', and not both",
            )
        if every is not None and body.get("timezone"):
            raise Refused(
                "bad_schedule",
                "'timezone' is for cron "
                "schedules; 'every' counts elapsed seconds",
            )
        priority = body.get("priority")
        if priority is not None and priority not in broker.levels:
            raise Refused(
                "unknown_priority",
                f"unknown priority level {priority!r} "
                "(levels: " + ",".join(broker.levels) + ")",
            )
        payload = dumps(body.get("payload"))
        if len(payload.encode("utf-8")) > codec.MAX_PAYLOAD_SIZE:
            raise Refused(
                "too_large",
                f"payload exceeds the limit of {codec.MAX_PAYLOAD_SIZE} bytes",
            )
        now = broker.clock.seconds()
        try:
            # (Checks the zone too: 'every' has none but UTC.)
            first = next_tick(now, every, cron, timezone)
        except ValueError as e:
            raise Refused("bad_schedule", one_line(e)) from None
        return ScheduleRow(
            name=body["name"],
            handler=body["handler"],
            payload=payload,
            priority=priority,
            max_attempts=body.get("max_attempts"),
            time_limit=body.get("time_limit"),
            every=every,
            cron=cron,
            timezone=timezone,
            skip_if_running=bool(body.get("skip_if_running")),
            paused=False,
            next_tick=first,
            last_tick=None,
            last_task_id=None,
            created_at=now,
            submitter=submitter_of(key),
        )

    def list(self, body, key):
        self._admin(key, "listing schedules")
        return self._broker.store.schedules().addCallback(
            lambda rows: {"schedules": [schedule_object(row) for row in rows]}
        )

    def remove(self, body, key):
        self._admin(key, "removing a schedule")
        name = body["name"]

        def removed(found):
            if not found:
                raise _no_schedule(name)
            self.log.info("schedule {name} removed", name=name)
            return {"removed": name}

        return self._broker.store.remove_schedule(name).addCallback(removed)

    def pause(self, body, key):
        self._admin(key, "pausing a schedule")
        return self._set_paused(body["name"], True, None)

    @defer.inlineCallbacks
    def resume(self, body, key):
        """
        Resume a schedule: it next comes due at its first tick after now;
        the ticks it missed while paused are not enqueued.
        """
        self._admin(key, "resuming a schedule")
        name = body["name"]
        rows = yield self._broker.store.schedules([name])
        if not rows:
            raise _no_schedule(name)
        try:
            following = next_tick(
                self._broker.clock.seconds(),
                rows[0].every,
                rows[0].cron,
                rows[0].timezone,
            )
        except ValueError as e:
            raise Refused("bad_schedule", one_line(e)) from None
        answer = yield self._set_paused(name, False, following)
        return answer

    def _set_paused(self, name, paused, following):
        store = self._broker.store
        d = store.pause_schedule(
            name, paused, 0.0 if following is None else following
        )

        def done(row):
            if row is None:
                raise _no_schedule(name)
            self.log.info(
                "schedule {name} {what}",
                name=name,
                what="paused" if paused else "resumed",
            )
            return {"schedule": schedule_object(row)}

        return d.addCallback(done)

    # -- ticks ---------------------------------------------------------------

    @defer.inlineCallbacks
    def tick(self):
        """
        Enqueue the ticks that came due: each schedule's ``next_tick``,
        once, however many ticks passed since (a broker that was down
        does not make up every tick it missed).
        """
        broker = self._broker
        if broker.stopped:
            return
        now = broker.clock.seconds()
        due = yield broker.store.due_schedules(now, DUE_BATCH)
        fired = []
        for row in due:
            try:
                fired.append(self._fire(row, now))
            except ValueError as e:
                # A row another program broke, or a zone this host lacks:
                # said now and then, and the others still run.
                if self._warnings.allow(row.name):
                    self.log.warn(
                        "schedule {name} cannot run: {reason}",
                        name=row.name,
                        reason=one_line(e),
                    )
        yield defer.gatherResults(fired, consumeErrors=True)

    def _fire(self, row, now):
        broker = self._broker
        if row.priority is not None and row.priority not in broker.levels:
            raise ValueError(
                f"its priority {row.priority!r} is not one of "
                "the levels " + ",".join(broker.levels)
            )
        following = next_tick(
            now, row.every, row.cron, row.timezone, previous=row.next_tick
        )
        task = NewTask(
            handler=row.handler,
            payload=row.payload,
            priority=row.priority or broker.config.default_priority,
            max_attempts=row.max_attempts or broker.config.max_attempts,
            created_at=now,
            unique_key=unique_key(row.name, row.next_tick),
            time_limit=row.time_limit,
            submitter=row.submitter,
        )
        d = broker.store.fire_schedule(
            row.name, row.next_tick, following, task, row.skip_if_running
        )
        d.addCallback(self._fired, row)
        return d

    def _fired(self, outcome, schedule):
        state, row = outcome
        broker = self._broker
        if state == "gone":
            return  # another broker's, or paused, changed or removed
        if state == "skipped":
            # Said when the skipping starts, not at every tick it lasts.
            if schedule.name not in self._skipping:
                self._skipping.add(schedule.name)
                self.log.info(
                    "schedule {name}: skipping ticks while its last task "
                    "{task_id} is queued or running (from the tick of "
                    "{tick})",
                    name=schedule.name,
                    tick=schedule_object(schedule)["next_tick"],
                    task_id=schedule.last_task_id,
                )
            return
        self._skipping.discard(schedule.name)
        if state != "enqueued":
            return
        self.log.info(
            "schedule {name}: task {task_id} for the tick of {tick}",
            name=schedule.name,
            task_id=row.id,
            tick=schedule_object(schedule)["next_tick"],
        )
        broker.claims.inserted((row.id,))
        broker.status.tasks.add(row.state, row.priority, row.handler)
        broker.backlog.admit(row)
        broker.feeder.wake()


def _no_schedule(name):
    return Refused("not_found", f"no schedule named {name!r}")


def describe_timing(row):
    """
    How a schedule comes due, in words: ``every 60s`` or ``cron "0 3 * *
    *" (Europe/Paris)``.
    """
    if row.every is not None:
        return f"every {row.every:g}s"
    return f'cron "{row.cron}" ({row.timezone})'
