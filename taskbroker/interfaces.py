# -*- test-case-name: tests.unit.test_interfaces -*-
"""
The interfaces that plugins and storage backends implement.

Every implementation in this package is declared with ``@implementer`` and
checked with ``verifyObject`` in the unit tests.
"""

from zope.interface import Attribute, Interface

from taskbroker.store import FINAL_STATES


class ITask(Interface):
    """
    What a handler sees of the task it runs.
    """

    id = Attribute("The task's id: an ``int``, unique and increasing.")
    handler = Attribute("The name of the handler that runs it (``str``).")
    payload = Attribute(
        "The task's input: any JSON value (already decoded), as submitted."
    )
    priority = Attribute("The task's priority level name (``str``).")
    attempt = Attribute(
        "This dispatch's attempt number (``int``, 1 for the first run). "
        "A task may run more than once (at-least-once delivery), so "
        "handlers should be idempotent."
    )
    max_attempts = Attribute("How many attempts the task may use (``int``).")
    token = Attribute(
        "This dispatch's fencing token (``int``): different for every "
        "dispatch of the task, even one that does not count as an attempt "
        "(after a broker restart or a worker's shutdown)."
    )
    clock = Attribute(
        "For handlers that do not block: the worker's ``IReactorTime``, to "
        "wait with (use it rather than importing the reactor, so tests can "
        "pass a ``Clock``).  For blocking handlers, which run in a handler "
        "process with no reactor: an object with only ``seconds()``."
    )

    def progress(fraction, message=None):
        """
        Say how far the task has got: ``taskbroker status``, ``list``, the
        API and the dashboard show the latest report of the running
        attempt.  Call it as often as is convenient, from any thread:
        reports are thinned out on their way (at most two a second reach
        the broker, the latest always), and the broker keeps the latest,
        writing it at most about once a second.

        :param fraction: a number from 0 to 1 (``0.25``: a quarter done).
        :param message: a short text, or ``None``; cut to 200 characters.
        :raises ValueError: if ``fraction`` is not a number from 0 to 1.
        :raises TypeError: if ``message`` is not a string.
        """


class ITaskHandler(Interface):
    """
    A kind of task a worker can run, found as a ``twisted.plugin`` plugin.

    Put a module that defines an object providing both
    :class:`twisted.plugin.IPlugin` and this interface into a folder given
    to the worker with ``--handlers-path`` (or into the
    ``taskbroker.plugins`` package).  A handler object is shared by all the
    worker's slots, so it must be stateless or safe to share.
    """

    name = Attribute(
        "The handler's name (``str``): unique among the handlers a worker "
        "loads, 1 to 200 characters, and the value of a task's ``handler`` "
        "field in the database, the protocol and the command line."
    )
    blocking = Attribute(
        "``True`` if ``run`` blocks (CPU work, blocking I/O): the worker "
        "then calls it outside the reactor thread.  ``False`` if ``run`` "
        "returns at once with a value or a ``Deferred``; it then runs in "
        "the reactor and must never block."
    )

    def run(task):
        """
        Run one task.

        :param task: the task to run.
        :type task: :class:`ITask`
        :returns: a JSON-serialisable result, or (when not ``blocking``) a
            ``Deferred`` firing with one.  Raising, or a failing
            ``Deferred``, fails the attempt; a result that is not
            JSON-serialisable fails it too.
        """


class ITaskStore(Interface):
    """
    Where tasks live: the truth, of which the broker keeps a cache.

    Every method returns a ``Deferred``.  A write's ``Deferred`` fires only
    after the change is committed; writes issued in the same reactor turn
    may share one transaction (group commit).  Times are Unix times in
    seconds (``float``), passed in by the caller so that the store reads no
    clock.  Payloads and results are passed as JSON text, never decoded
    here.

    A write fails with :class:`taskbroker.errors.StoreError` when the
    database cannot be used, and with its subclass
    :class:`taskbroker.errors.WriteRefused` when the database refused that
    write alone (a constraint): the writes it shared a transaction with
    are not affected.
    """

    def claims(broker_id):
        """
        The claim source through which a broker with this id finds the
        tasks it may dispatch from this store.

        :returns: an :class:`IClaimSource`.
        """

    def open():
        """
        Create or upgrade the schema; a store that one broker owns at a
        time (SQLite) takes ownership here.

        :returns: a ``Deferred`` firing with ``None``, or failing with
            :class:`taskbroker.errors.StoreLocked` when another broker owns
            the database, or :class:`taskbroker.errors.StoreError`.
        """

    def close():
        """
        Wait for pending writes, release ownership and close.

        :returns: a ``Deferred`` firing with ``None``.  Safe to call twice.
        """

    write_error = Attribute(
        "``None`` while writes work; after a write transaction failed, and "
        "until one commits again, why it failed (``str``, one line).  A "
        "store that fails writes tries an empty write now and then, so that "
        "this clears by itself when the trouble passes."
    )

    def when_lost():
        """
        Wait until the store finds that it can no longer keep its promises
        (its database was removed, replaced or found damaged).  From then
        on its writes fail with :class:`taskbroker.errors.StoreLost` and
        none is acknowledged: the broker must stop.  Passing trouble (a
        locked database, a full disk) does not count.

        :returns: a ``Deferred`` firing with a one-line message saying
            what happened; it never fires for a store that stays sound.
        """

    def check():
        """
        Look for damage in the database, without holding up the store's
        other work (the SQLite store runs ``PRAGMA quick_check``).  A
        damaged database is lost (see :meth:`when_lost`).

        :returns: a ``Deferred`` firing with ``None``, or failing with
            :class:`taskbroker.errors.StoreLost` if the database is
            damaged, or with :class:`taskbroker.errors.StoreError` if it
            could not be checked.
        """

    def submit(tasks):
        """
        Insert new tasks in ``queued`` state (``running`` for those given
        a ``worker``), all in one transaction.

        If the tasks' ``request_id`` is not ``None`` and tasks with that
        ``request_id`` already exist (a client sent its request again after
        losing the reply), nothing is inserted: the call returns those
        tasks, as they are now, in id order, each with ``created`` false.

        Otherwise each task is inserted in order, except one whose
        ``unique_key`` a queued or running task already holds (possibly one
        inserted earlier in the same call): that task is returned instead,
        as it is now, with ``created`` false.

        :param tasks: a ``list`` of :class:`taskbroker.store.NewTask`, all
            with the same ``request_id`` (``None`` or not).
        :returns: a ``Deferred`` firing with a ``list`` of
            :class:`taskbroker.store.Submitted` ``(row, created)`` pairs,
            one per task and in the same order (when the ``request_id`` was
            seen before: one per existing task), where ``row`` is a
            :class:`taskbroker.store.TaskRow`.  It fails with
            ``ValueError`` if the tasks do not share one ``request_id``.
        """

    def dispatch(
        task_id, token, worker, started_at, priority=None, max_attempts=None
    ):
        """
        Record that a queued task went to ``worker``: it becomes
        ``running`` with the new ``token``, one more attempt used
        (``attempts + 1``), ``worker`` and ``started_at`` set and
        ``finished_at`` cleared.  A ``priority`` or ``max_attempts`` left
        NULL by the program that inserted the row is filled with the given
        value (the broker's default), so that the row says how it ran.

        :param int token: the new fencing token: the task's current
            ``token`` plus one.  A task whose token is not ``token - 1``
            is left alone, as if it were not queued (the caller's copy of
            the row is out of date).
        :returns: a ``Deferred`` firing with ``True`` if the task was
            queued and is now ``running``, else ``False`` (nothing
            changed).
        """

    def progress(task_id, token, fraction, message, at):
        """
        Record how far a running task's current dispatch has got, as its
        handler reported it.

        :param fraction: a number from 0 to 1.
        :param message: a short text (at most 200 characters) or ``None``.
        :param at: when the handler reported it (Unix time).
        :returns: a ``Deferred`` firing with ``True`` if the task was
            ``running`` with that ``token`` and the change was made, else
            ``False`` (stale or unknown: nothing changed).
        """

    def finish(task_id, token, state, result, error, traceback, finished_at):
        """
        Record the end of a running task's current dispatch.

        :param state: ``"succeeded"``, ``"failed"`` or ``"cancelled"``.
        :param result: JSON text or ``None``.
        :param error: an error message or ``None``.
        :param traceback: the failed attempt's traceback (``str``) or
            ``None``.
        :returns: a ``Deferred`` firing with ``True`` if the task was
            ``running`` with that ``token`` and the change was made, else
            ``False`` (stale or unknown: nothing changed).  It fails with
            ``ValueError`` for any other ``state``.
        """

    def requeue(
        task_id, token, run_at=None, error=None, traceback=None, consumed=True
    ):
        """
        Put a running task back in ``queued`` state, to run again.  The
        task keeps its ``token``, ``worker`` and ``started_at`` until the
        next dispatch.

        :param run_at: the Unix time before which it must not run again, or
            ``None`` for as soon as possible.
        :param error: the error of the attempt that ended, or ``None``;
            stored in ``error``, which stays visible while the task waits.
        :param traceback: that attempt's traceback, or ``None``.
        :param bool consumed: ``False`` if the attempt does not count (its
            worker was shut down gracefully, or the broker restarted): the
            attempt is given back (``attempts - 1``, never below 0).
        :returns: a ``Deferred`` firing with ``True`` if the task was
            ``running`` with that ``token`` and is now ``queued``, else
            ``False`` (nothing changed).
        """

    def cancel(task_id, finished_at):
        """
        Cancel a queued or running task: its state becomes ``cancelled``,
        its ``error`` ``"cancelled"`` and its ``finished_at`` is set (its
        ``traceback``, if any, stays that of the latest failed attempt).
        Its ``token`` is kept.  A running task's worker is not told here;
        its report then finds the task no longer running and changes
        nothing.

        :returns: a ``Deferred`` firing with the task's
            :class:`taskbroker.store.TaskRow` after the change (a task that
            had already finished is returned unchanged, so its ``state``
            tells whether it was cancelled), or ``None`` if there is no such
            task.
        """

    def retry(task_id):
        """
        Queue a failed or cancelled task again, with all its attempts
        available: ``attempts`` becomes 0 and ``run_at``, ``finished_at``,
        ``result``, ``error`` and ``traceback`` are cleared.  Its ``token``
        is kept (tokens never go down).

        A task whose ``unique_key`` another queued or running task now holds
        is not retried.

        :returns: a ``Deferred`` firing with the task's
            :class:`taskbroker.store.TaskRow` after the change (a task in
            another state, or one whose key is taken, is returned
            unchanged, so its ``state`` tells whether it was queued), or
            ``None`` if there is no such task.
        """

    def reject(task_id, error, finished_at):
        """
        Fail a queued row that did not pass validation.

        :returns: a ``Deferred`` firing with ``None``.
        """

    def reject_group(handler, priority, error, finished_at):
        """
        Fail every queued row with this ``handler`` and ``priority`` (both
        as stored, ``priority`` possibly ``None``): rows no broker can run,
        failed without reading them one by one.

        :returns: a ``Deferred`` firing with the number of rows failed.
        """

    def get(task_id):
        """
        :returns: a ``Deferred`` firing with a
            :class:`taskbroker.store.TaskRow`, or ``None``.
        """

    def list(
        state,
        handler,
        after_id,
        limit,
        max_bytes=None,
        submitter=None,
        priority=None,
        before_id=None,
        newest_first=False,
    ):
        """
        Tasks ordered by id, optionally filtered.

        :param state: a state name or ``None`` for all.
        :param handler: a handler name or ``None`` for all.
        :param submitter: a client's public key (Z85 text): only the tasks
            it submitted; ``None`` for all.
        :param priority: a level name or ``None`` for all.
        :param after_id: return only tasks with a greater id; ``0`` for all.
        :param before_id: return only tasks with a smaller id, or ``None``.
        :param newest_first: highest ids first (else lowest first).
        :param limit: the most rows to return.
        :param max_bytes: if given, stop after the row that brings the
            rows' :func:`taskbroker.store.text_size` to this many, so that
            large rows are never read by the thousand.
        :returns: a ``Deferred`` firing with a ``list`` of
            :class:`taskbroker.store.TaskRow`.
        """

    def counts(now):
        """
        Count the tasks, for statistics.  Reads the whole table.

        :param now: the time after which a queued task's ``run_at`` makes
            it *delayed*.
        :returns: a ``Deferred`` firing with a ``dict`` mapping ``(state,
            priority, handler, delayed)`` to a count of tasks, where
            ``delayed`` is a ``bool`` (always false unless ``queued``).
        """

    def add_schedule(row, replace=False):
        """
        Add a periodic task.

        :param row: a :class:`taskbroker.store.ScheduleRow`.
        :param replace: replace a schedule of the same name, if any.
        :returns: a ``Deferred`` firing with ``True``, or ``False`` when a
            schedule of that name exists and ``replace`` is false (nothing
            is written then).
        """

    def schedules(names=None):
        """
        :param names: the names to read (an iterable of ``str``), or
            ``None`` for every schedule.
        :returns: a ``Deferred`` firing with a ``list`` of
            :class:`taskbroker.store.ScheduleRow`, by name.
        """

    def remove_schedule(name):
        """
        :returns: a ``Deferred`` firing with whether there was one.
        """

    def pause_schedule(name, paused, next_tick):
        """
        Pause a schedule, or resume it so that it next comes due at
        ``next_tick`` (a schedule already so is left as it is).

        :returns: a ``Deferred`` firing with the
            :class:`taskbroker.store.ScheduleRow` as it now is, or ``None``
            if there is none of that name.
        """

    def due_schedules(now, limit):
        """
        :returns: a ``Deferred`` firing with at most ``limit`` schedules
            that are not paused and whose ``next_tick`` is ``now`` or
            earlier, the earliest first.
        """

    def fire_schedule(name, tick, next_tick, task, skip_if_running):
        """
        Handle a schedule's tick: in one transaction, move its
        ``next_tick`` from ``tick`` to ``next_tick`` if it still holds
        ``tick`` (the compare-and-set that makes each tick happen once
        however many brokers share the database), and insert ``task``
        (a :class:`taskbroker.store.NewTask` whose ``unique_key`` names
        the tick) unless ``skip_if_running`` and the schedule's previous
        task is still queued or running.

        :returns: a ``Deferred`` firing with ``("enqueued", row)``,
            ``("existing", row)`` (a live task holds the unique key),
            ``("skipped", None)`` or ``("gone", None)`` (another broker
            handled the tick, or the schedule was paused, changed or
            removed).
        """

    def purge(
        finished_before,
        states=FINAL_STATES,
        handler=None,
        submitter=None,
        limit=500,
    ):
        """
        Delete at most ``limit`` finished tasks, those that finished
        earliest first: a small batch, so that the transaction holds its
        locks briefly.

        :param finished_before: a Unix time.
        :param states: the final states to delete.
        :param handler: only tasks of this handler, if not ``None``.
        :param submitter: only tasks this client key submitted, if not
            ``None``.
        :returns: a ``Deferred`` firing with a ``list`` of ``(priority,
            handler, state)``, one per task deleted.
        """

    def count(state, handler=None, submitter=None):
        """
        :returns: a ``Deferred`` firing with the number of tasks in
            ``state`` (of ``handler`` and ``submitter``, if not ``None``).
        """

    def setting(name):
        """
        :returns: a ``Deferred`` firing with the value (``str``) of a
            setting of the database (``default_keep_finished``), or
            ``None``.
        """


class IQueueReads(Interface):
    """
    The reads a single owner's claim source is built on
    (:class:`taskbroker.store.claims.OwnerClaims`): a database that one
    broker owns at a time (SQLite) serves them from its indexes, and that
    broker may treat what it reads as claimed.
    """

    def scan_queued(after_id, limit, known):
        """
        What the broker's poller reads to find tasks that other programs
        inserted: queued tasks with ``id > after_id``, by id, including
        those whose ``run_at`` is still to come (the caller decides when to
        run them).
        Rows whose id is in ``known`` (tasks the broker already holds) are
        left out before they are read, which keeps a poll cheap while the
        queue is full of tasks submitted through the broker.

        :param known: a ``frozenset`` of task ids.
        :returns: a ``Deferred`` firing with ``(rows, last_id)``: the
            :class:`taskbroker.store.TaskRow` list, by id, and the highest
            id scanned (``after_id`` if none was), up to ``limit`` ids.
        """

    def queued_groups():
        """
        What the broker reads at start instead of every queued row: the
        distinct ``(handler, priority)`` pairs of queued tasks (as stored:
        ``priority`` may be ``None`` or any value another program wrote),
        and the highest queued id.  Costs one index seek per pair, however
        deep the queue.

        :returns: a ``Deferred`` firing with ``(pairs, last_id)``: a
            ``list`` of ``(handler, priority)`` and an ``int`` (``0`` when
            nothing is queued).
        """

    def queued_window(handler, priorities, after_id, limit, now):
        """
        The next queued tasks of one queue, oldest first, to refill the
        broker's window of it: tasks with this ``handler``, a priority in
        ``priorities`` (``None`` in it matches NULL), ``id > after_id``
        and due (``run_at`` NULL or at most ``now``, or not a number: such
        rows never come due, so they are read for the broker to reject).

        :returns: a ``Deferred`` firing with a ``list`` of at most
            ``limit`` :class:`taskbroker.store.TaskRow`, by id.
        """

    def delayed_window(after, limit):
        """
        The next queued tasks with a ``run_at``, to refill the broker's
        window of delayed tasks: in ``(run_at, id)`` order, those after
        ``after`` (a ``(run_at, id)`` pair).

        :returns: a ``Deferred`` firing with a ``list`` of at most
            ``limit`` :class:`taskbroker.store.TaskRow`.
        """

    def running():
        """
        :returns: a ``Deferred`` firing with the ``list`` of running
            :class:`taskbroker.store.TaskRow`.
        """


class IClaimSource(Interface):
    """
    Decides which queued tasks a broker may hold for dispatch: the store
    is the truth of what is claimable, not a broker's memory.

    A single owner (SQLite) claims ahead: a window of each queue, read as
    it drains, and tasks found by polling.  A store shared by several
    brokers claims only for idle credits, so that a task waits in the
    database, never in another broker's memory, and holds its claims
    under a lease that the broker renews; the claims of a broker that
    stopped renewing go to the others.  Delayed tasks are claimed only
    when due.  Every dispatch is still a compare-and-set on the task's
    state and token, so a claim lost to another broker can never run a
    task twice.

    Every method that reads or writes returns a ``Deferred``.
    """

    shared = Attribute(
        "``bool``: ``False`` for a single owner, which claims ahead (the "
        "broker holds a window of each queue); ``True`` for a store shared "
        "by several brokers, which claims only for idle credits, "
        "dispatching what it claims at once (:meth:`dispatch_for`)."
    )
    lease = Attribute(
        "Seconds a broker's claims last unless renewed (:meth:`renew`), or "
        "``None`` if they never lapse."
    )

    def start(now, on_change, on_finished=None):
        """
        Begin claiming as this source's broker.

        :param on_change: called (with no arguments) when tasks may have
            become claimable: inserted by another program or broker,
            released, or reclaimed from a broker that stopped renewing.
        :param on_finished: for a shared store, called when other brokers
            ended tasks (a ``WAIT`` here may be for one of them): with a
            ``list`` of task ids, or ``None`` when they were too many to
            name (any waited task may have ended).
        :returns: a ``Deferred`` firing with the ``list`` of running
            :class:`taskbroker.store.TaskRow` whose attempts this broker now
            answers for (a single owner: every running task).
        """

    def stop():
        """
        Give up every claim (the broker is stopping).

        :returns: a ``Deferred`` firing with ``None``.
        """

    def queues():
        """
        The queues that hold queued tasks: a single owner loads a window
        of each; the brokers of a shared store look among them for those
        no broker can run, to fail their tasks.

        :returns: a ``Deferred`` firing with a ``list`` of ``(handler,
            priority)`` pairs, as stored (``priority`` may be ``None`` or
            any value another program wrote).
        """

    def claim_queue(handler, priorities, after_id, limit, now):
        """
        For a single owner: claim the next due tasks of one queue, oldest
        first (see :meth:`IQueueReads.queued_window`).

        :returns: a ``Deferred`` firing with a ``list`` of
            :class:`taskbroker.store.TaskRow`.
        """

    def claim_for(levels, handlers, limit, now):
        """
        For a shared store: claim up to ``limit`` due tasks for idle
        credits of workers that serve ``levels`` and have ``handlers``: the
        most urgent level first, the oldest first within a level.

        :param levels: priority level names (``None`` matches a NULL
            priority: pass it along with the default level).
        :returns: a ``Deferred`` firing with a ``list`` of
            :class:`taskbroker.store.TaskRow`.
        """

    def dispatch_for(levels, handlers, workers, now, priority, max_attempts):
        """
        For a shared store: claim up to ``len(workers)`` tasks as
        :meth:`claim_for` does and dispatch them (as
        :meth:`ITaskStore.dispatch` does) in the same durable commit, the
        i-th to ``workers[i]``, with ``now`` as their ``started_at`` and
        ``priority`` and ``max_attempts`` for what their inserter left
        NULL.  The broker sends their TASKs after it: one commit per task
        instead of a claim and then a dispatch.

        :param workers: worker names, one per idle credit (a worker with
            two idle slots appears twice).
        :returns: a ``Deferred`` firing with a ``list`` as long as
            ``workers``: the dispatched :class:`taskbroker.store.TaskRow`
            for each worker (running, with its new token), or ``None``
            where no task was left for it.
        """

    def upcoming(after, limit):
        """
        The next delayed tasks, by ``(run_at, id)`` after ``after``, without
        claiming them (see :meth:`IQueueReads.delayed_window`): a single
        owner holds them until due; a shared store's broker only times
        its next claim by them.

        :returns: a ``Deferred`` firing with a ``list`` of
            :class:`taskbroker.store.TaskRow`.
        """

    def poll(limit):
        """
        For a single owner: the queued tasks that other programs inserted
        since the last poll (tasks this broker inserted, see
        :meth:`inserted`, are left out), up to ``limit`` at a time.

        :returns: a ``Deferred`` firing with ``(rows, cursor)``: the
            :class:`taskbroker.store.TaskRow` list, by id, and where this
            poll ended, or ``None`` if it found nothing new.  Once the
            broker has handled the rows (failed the invalid ones), it
            confirms with :meth:`polled`; until then, the next poll reads
            them again.
        """

    def polled(cursor):
        """
        The rows of the poll that ended at ``cursor`` are handled: the next
        poll starts after it.
        """

    def inserted(task_ids):
        """
        Tasks this broker inserted or queued again (submit, retry): they
        are its claims; on a shared store, of the tasks it inserted only
        those it dispatched in the insert are (the others wait unclaimed
        for any broker's idle credit).
        """

    def release(task_ids):
        """
        Tasks this broker claimed but no longer holds and did not dispatch:
        claimable by any broker again.
        """

    def renew(now):
        """
        Extend this broker's claims.

        :returns: a ``Deferred`` firing with ``None`` while the lease
            holds.  If it had lapsed, it fires with the ids of the running
            tasks whose claims other brokers took meanwhile (a ``set``,
            perhaps empty): the broker must stop those attempts and drop
            what it holds, and starts over; the claims nobody took stay
            its own.
        """

    def reclaim(now, grace):
        """
        Take back the claims of brokers that stopped renewing: their queued
        claims are freed at once, and their running tasks, once the lease
        has been over for ``grace`` seconds (their workers' time to bring
        them to another broker, see :meth:`adopt`), are queued again with
        the attempt given back (a compare-and-set on state and token; a
        late result from their workers is refused).  Safe to run on every
        broker at once.

        :returns: a ``Deferred`` firing with the number of tasks freed.
        """

    def adopt(task_id, token):
        """
        A worker that moved from another broker still runs ``task_id``
        under ``token``: take the attempt over if its broker's lease
        lapsed (or it is this broker's own).

        :returns: a ``Deferred`` firing with ``("adopted", row)`` (the
            task's :class:`taskbroker.store.TaskRow`) if the attempt is now
            this broker's; ``("held", None)`` while the broker that
            dispatched it holds its lease (ask again later); ``("stale",
            None)`` if the attempt is not current (the worker must stop
            it).  A single owner has every running task already.
        """

    def watch(task_id):
        """
        A ``WAIT`` here is for ``task_id``, which another broker may end:
        have the store tell this broker when it does (``on_finished`` of
        :meth:`start`).  Nothing to do for a single owner.

        :returns: a ``Deferred`` firing with ``None`` once asked.
        """

    def holding():
        """
        What the store says this broker holds, to find claims it holds
        without knowing (a commit whose answer was lost with the
        connection).

        :returns: a ``Deferred`` firing with a ``dict`` mapping task ids to
            ``"queued"`` or ``"running"``.
        """

    def let_go(task_ids):
        """
        Give up tasks the store says this broker holds but it does not:
        queued ones become anyone's, running ones are queued again with a
        new token and the attempt given back.

        :returns: a ``Deferred`` firing with the number let go.
        """
