# -*- test-case-name: tests.unit.test_interfaces -*-
"""
The interfaces that plugins and storage backends implement.

Every implementation in this package is declared with ``@implementer`` and
checked with ``verifyObject`` in the unit tests.
"""

from zope.interface import Attribute, Interface


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
    clock = Attribute(
        "The worker's ``IReactorTime``, for handlers that wait (use it "
        "rather than importing the reactor, so tests can pass a ``Clock``)."
    )


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
    """

    def open():
        """
        Create or upgrade the schema and take ownership of the database.

        :returns: a ``Deferred`` firing with ``None``, or failing with
            :class:`taskbroker.errors.StoreLocked` when another broker owns
            the database, or :class:`taskbroker.errors.StoreError`.
        """

    def close():
        """
        Wait for pending writes, release ownership and close.

        :returns: a ``Deferred`` firing with ``None``.  Safe to call twice.
        """

    def submit(tasks):
        """
        Insert new tasks in ``queued`` state.

        :param tasks: a ``list`` of :class:`taskbroker.store.NewTask`.
        :returns: a ``Deferred`` firing with the ``list`` of inserted
            :class:`taskbroker.store.TaskRow`, in order.
        """

    def dispatch(task_id, attempt, worker, started_at):
        """
        Record that ``attempt`` of a queued task went to ``worker``.

        :returns: a ``Deferred`` firing with ``True`` if the task was
            queued and is now ``running``, else ``False``.
        """

    def finish(task_id, attempt, state, result, error, finished_at):
        """
        Record the end of a running attempt.

        :param state: ``"succeeded"`` or ``"failed"``.
        :param result: JSON text or ``None``.
        :param error: an error message or ``None``.
        :returns: a ``Deferred`` firing with ``True`` if ``attempt`` was the
            task's current running attempt and the change was made, else
            ``False`` (stale or unknown: nothing changed).
        """

    def requeue(task_id, attempt):
        """
        Put a running attempt's task back in ``queued`` state.

        :returns: a ``Deferred`` firing with ``True`` if it was running with
            that attempt, else ``False``.
        """

    def cancel(task_id, finished_at):
        """
        Cancel a queued task.

        :returns: a ``Deferred`` firing with the task's
            :class:`taskbroker.store.TaskRow` after the change (its
            ``state`` tells whether it was cancelled), or ``None`` if there
            is no such task.
        """

    def fix(task_id, priority, max_attempts):
        """
        Fill in the priority and max_attempts of a row inserted by SQL
        with NULLs.

        :returns: a ``Deferred`` firing with ``None``.
        """

    def reject(task_id, error, finished_at):
        """
        Fail a queued row that did not pass validation.

        :returns: a ``Deferred`` firing with ``None``.
        """

    def get(task_id):
        """
        :returns: a ``Deferred`` firing with a
            :class:`taskbroker.store.TaskRow`, or ``None``.
        """

    def list(state, handler, after_id, limit):
        """
        Tasks ordered by id, optionally filtered.

        :param state: a state name or ``None`` for all.
        :param handler: a handler name or ``None`` for all.
        :param after_id: return only tasks with a greater id; ``0`` for all.
        :param limit: the most rows to return.
        :returns: a ``Deferred`` firing with a ``list`` of
            :class:`taskbroker.store.TaskRow`.
        """

    def queued(after_id, limit):
        """
        Queued tasks with ``id > after_id``, by id: what the broker loads at
        start and what its poller finds inserted by other programs.

        :returns: a ``Deferred`` firing with a ``list`` of
            :class:`taskbroker.store.TaskRow`.
        """

    def running():
        """
        :returns: a ``Deferred`` firing with the ``list`` of running
            :class:`taskbroker.store.TaskRow`.
        """

    def counts():
        """
        :returns: a ``Deferred`` firing with a ``dict`` mapping
            ``(state, priority)`` to a count of tasks.
        """
