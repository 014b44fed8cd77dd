# -*- test-case-name: tests.unit.test_outcomes -*-
"""
How attempts end: a result recorded, a failure retried after a backoff or
made final, an attempt put back in its queue; and who is told when a task
reaches its final state (:meth:`Outcomes.when_final`, for WAIT and for
anything else that waits on a task).

The retry policy (:class:`RetryPolicy`) is pure; :class:`Outcomes` writes
to the store and hands requeued tasks to the backlog.
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskbroker.broker.attempts import Attempt
from taskbroker.broker.status import DELAYED
from taskbroker.errors import TaskbrokerError
from taskbroker.logs import TaskLog, cut, seconds
from taskbroker.protocol import codec
from taskbroker.protocol.codec import dumps

if TYPE_CHECKING:
    from random import Random

    from taskbroker.broker.core import Broker
    from taskbroker.config import BrokerConfig
    from taskbroker.store import TaskRow


def _end_details(task: Mapping[str, Any]) -> str:
    return (
        f"{task['handler']}, priority {task['priority']}, worker "
        f"{task['worker']}, attempt {task['attempt']}, ran "
        f"{seconds(task['ran'])}"
        + ("" if task["error"] is None else f": {task['error']}")
    )


class BrokerStopping(TaskbrokerError):
    """
    The broker stopped before the task a caller waited for ended.
    """


class RetryPolicy:
    """
    When a failed attempt is tried again.

    :param config: a :class:`taskbroker.config.BrokerConfig` (its
        ``retry_delay``, ``retry_max_delay`` and ``max_attempts``).
    :param rng: a ``random.Random`` for the jitter.
    """

    def __init__(self, config: "BrokerConfig", rng: "Random") -> None:
        self._config = config
        self._random = rng

    def max_attempts(self, row: "TaskRow") -> int:
        """
        The attempts ``row`` may use (the broker's default if NULL).
        """
        return row.max_attempts or self._config.max_attempts

    def backoff(self, attempt: int) -> float:
        """
        The delay before attempt ``attempt + 1``, after attempt ``attempt``
        failed: exponential, with "equal jitter" (half fixed, half random),
        so that tasks failing together do not all come back together.
        """
        delay: float = min(
            self._config.retry_max_delay,
            self._config.retry_delay * 2 ** (attempt - 1),
        )
        return delay / 2 + self._random.uniform(0, delay / 2)


class Outcomes:
    """
    Records the ends of attempts, and answers those waiting for tasks.

    :param broker: the :class:`taskbroker.broker.core.Broker` this belongs
        to (its ``store``, ``clock``, ``backlog``, ``attempts`` and
        ``counters``).
    :param policy: a :class:`RetryPolicy`.
    """

    log = Logger()

    def __init__(self, broker: "Broker", policy: RetryPolicy) -> None:
        self._broker = broker
        self.policy = policy
        # task id -> list of Deferreds from when_final
        self._waiters: dict[int, list[defer.Deferred[TaskRow | None]]] = {}
        # task id -> reports being written (see reporting)
        self._reporting: dict[int, int] = {}
        self.end_log = TaskLog(
            self.log,
            broker.clock,
            "ended",
            lambda t: f"task {t['id']} {t['outcome']}: {_end_details(t)}",
            lambda t: f"{t['id']} {t['outcome']} ({_end_details(t)})",
        )

    # -- reports -----------------------------------------------------------

    def report(
        self, attempt: Attempt, state: str, body: Mapping[str, Any]
    ) -> defer.Deferred[Any]:
        """
        Record what a worker reported of ``attempt`` (see
        :meth:`_report`); until the store has it, the task counts as
        :meth:`reporting`.
        """
        task_id = attempt.task_id
        self._reporting[task_id] = self._reporting.get(task_id, 0) + 1

        def reported(result: object) -> object:
            left = self._reporting.pop(task_id) - 1
            if left:
                self._reporting[task_id] = left
            self._watch_if_elsewhere(task_id)
            return result

        return self._report(attempt, state, body).addBoth(reported)

    def reporting(self, task_id: int) -> bool:
        """
        Whether a worker's report of the task is being written: a WAIT
        for it waits for that, without reading the task.
        """
        return task_id in self._reporting

    def _watch_if_elsewhere(self, task_id: int) -> None:
        """
        On a shared store, a task waited for here that this broker did
        not end and no longer holds may end on another broker: be told.
        """
        broker = self._broker
        if (
            broker.claims.shared
            and self.is_waited(task_id)
            and task_id not in broker.attempts
            and not broker.backlog.holds(task_id)
        ):
            broker.requests.watch(task_id)

    def _report(
        self, attempt: Attempt, state: str, body: Mapping[str, Any]
    ) -> defer.Deferred[Any]:
        """
        Record what a worker reported of ``attempt``, which the caller has
        already taken out of the ledger.

        :param state: ``"succeeded"``, ``"failed"`` or ``"released"``.
        :param body: the RESULT message's body.
        :returns: a ``Deferred`` that fires when the store has it (then the
            worker may be acknowledged), or fails if it could not be
            written.
        """
        broker = self._broker
        task_id, token, row = attempt.task_id, attempt.token, attempt.row
        broker.progress.flush(attempt)
        if state == "released":
            return self.requeue(
                attempt,
                "handed back by its worker",
                consumed=False,
                trap=False,
            )
        if state != "succeeded":
            return self.fail(
                attempt,
                body.get("error") or "failed",
                body.get("traceback"),
                body.get("permanent"),
            )
        now = broker.clock.seconds()
        # It was decoded from JSON, so it encodes again.
        result = dumps(body.get("result"))
        if len(result.encode("utf-8")) > codec.MAX_PAYLOAD_SIZE:
            error = (
                f"result exceeds the limit of {codec.MAX_PAYLOAD_SIZE} bytes"
            )
            d: defer.Deferred[bool] = broker.store.finish(
                task_id, token, "failed", None, error, None, now
            )
            return d.addCallback(self._finished, row, "failed", error=error)
        d = broker.store.finish(
            task_id, token, "succeeded", result, None, None, now
        )
        # The row as the store now has it, so that waiting clients are
        # answered without reading it back (unless the broker did not
        # hold its payload).
        final = (
            None
            if row.payload is None
            else row._replace(
                state="succeeded",
                attempts=row.attempts + 1,
                token=token,
                finished_at=now,
                result=result,
                error=None,
                traceback=None,
            )
        )
        return d.addCallback(self._finished, row, "succeeded", final)

    def fail(
        self,
        attempt: Attempt,
        error: str,
        traceback: str | None,
        permanent: bool | None,
    ) -> defer.Deferred[Any]:
        """
        An attempt failed: retry after a backoff, or fail the task.

        :returns: a ``Deferred`` that fires when the store has it.
        """
        broker = self._broker
        task_id, token, row = attempt.task_id, attempt.token, attempt.row
        used = row.attempts + 1
        max_attempts = self.policy.max_attempts(row)
        now = broker.clock.seconds()
        if permanent or used >= max_attempts:
            d: defer.Deferred[bool] = broker.store.finish(
                task_id, token, "failed", None, error, traceback, now
            )
            return d.addCallback(self._finished, row, "failed", error=error)
        delay = self.policy.backoff(used)
        run_at = now + delay
        broker.counters["retried"] += 1
        self.log.info(
            "task {task_id} attempt {attempt} of {max_attempts} failed "
            "({error}); retrying in {delay:.1f}s",
            task_id=task_id,
            attempt=used,
            max_attempts=max_attempts,
            error=error,
            delay=delay,
        )
        d = broker.store.requeue(
            task_id,
            token,
            run_at=run_at,
            error=error,
            traceback=traceback,
            consumed=True,
        )

        def requeued(changed: bool) -> None:
            if changed:
                counts = broker.status.tasks
                counts.move(row.priority, row.handler, "running", "queued")
                counts.move(row.priority, row.handler, None, DELAYED)
                broker.backlog.enqueue(
                    row._replace(
                        state="queued",
                        attempts=used,
                        token=token,
                        run_at=run_at,
                        error=error,
                        traceback=traceback,
                    )
                )

        return d.addCallback(requeued)

    def requeue(
        self, attempt: Attempt, reason: str, consumed: bool, trap: bool = True
    ) -> defer.Deferred[Any]:
        """
        Put an attempt's task back at the head of its queue, or fail it if
        the attempt counted and was its last.

        :param consumed: whether the attempt counts against the task.
        :param trap: if true, a failure to write is handled here (the
            attempt becomes an orphan, requeued by a later sweep) and the
            ``Deferred`` never fails; else it fails, for the caller.
        :returns: a ``Deferred`` that fires when the store has it.
        """
        broker = self._broker
        task_id, token, row = attempt.task_id, attempt.token, attempt.row
        now = broker.clock.seconds()
        used = row.attempts + 1
        max_attempts = self.policy.max_attempts(row)
        if consumed and used >= max_attempts:
            self.log.warn(
                "task {task_id} failed: {reason} during its last attempt "
                "({attempt} of {max_attempts})",
                task_id=task_id,
                reason=reason,
                attempt=used,
                max_attempts=max_attempts,
            )
            error = f"{reason} during attempt {used} of {max_attempts}"
            d: defer.Deferred[bool] = broker.store.finish(
                task_id, token, "failed", None, error, None, now
            )
            d.addCallback(self._finished, row, "failed", error=error)
        else:
            self.log.info(
                "task {task_id} requeued: {reason}",
                task_id=task_id,
                reason=reason,
            )
            d = broker.store.requeue(task_id, token, consumed=consumed)

            def requeued(changed: bool) -> None:
                if changed:
                    broker.status.tasks.move(
                        row.priority, row.handler, "running", "queued"
                    )
                    broker.backlog.enqueue(
                        row._replace(
                            state="queued",
                            token=token,
                            run_at=None,
                            attempts=used if consumed else row.attempts,
                        ),
                        front=True,
                    )

            d.addCallback(requeued)
        if not trap:
            return d

        def failed(reason: Failure) -> None:
            # Try again later: the attempt becomes an orphan, which the
            # sweep requeues when its deadline passes.
            broker.attempts.orphan(
                task_id, token, row, broker.monotonic() + broker.allowance()
            )
            broker.trouble(reason, "requeueing a task")

        return d.addErrback(failed)

    def _finished(
        self,
        changed: bool,
        row: "TaskRow",
        state: str,
        final: "TaskRow | None" = None,
        error: str | None = None,
    ) -> bool:
        """
        The store has a task's end (``changed``: it was current).
        ``row`` is the task as its last dispatch found it.
        """
        if changed:
            broker = self._broker
            broker.status.tasks.move(
                row.priority, row.handler, "running", state
            )
            started = row.started_at
            ran = (
                broker.clock.seconds() - started
                if isinstance(started, (int, float))
                else None
            )
            self.end_log.add(
                id=row.id,
                handler=row.handler,
                priority=row.priority,
                worker=row.worker,
                attempt=row.attempts + 1,
                outcome=state,
                ran=ran,
                error=cut(error),
            )
            broker.metrics.ended(
                row.priority or broker.config.default_priority,
                row.handler,
                state,
                ran,
            )
            self.notify(row.id, final)
        return changed

    # -- waiting for a task ------------------------------------------------

    def when_final(self, task_id: int) -> defer.Deferred["TaskRow | None"]:
        """
        Wait for a task to end.

        :returns: a ``Deferred`` that fires with the task's final
            :class:`taskbroker.store.TaskRow` when this broker ends it (or
            with ``None`` when the row is to be read from the store), or
            fails with :class:`BrokerStopping`.  Cancelling it stops the
            wait.
        """

        def cancel(d: "defer.Deferred[TaskRow | None]") -> None:
            waiting = self._waiters.get(task_id)
            if waiting is not None and d in waiting:
                waiting.remove(d)
                if not waiting:
                    del self._waiters[task_id]

        d: defer.Deferred[TaskRow | None] = defer.Deferred(cancel)
        self._waiters.setdefault(task_id, []).append(d)
        return d

    def waited(self) -> list[int]:
        """
        :returns: the ids of the tasks someone waits for (a ``list``).
        """
        return list(self._waiters)

    def is_waited(self, task_id: int) -> bool:
        """
        Whether someone waits for the task.
        """
        return task_id in self._waiters

    def notify(self, task_id: int, final: "TaskRow | None" = None) -> None:
        """
        A task has ended: fire its waiters.

        :param final: the task's row as committed, if known; else ``None``
            (the waiters read it).
        """
        for d in self._waiters.pop(task_id, ()):
            d.callback(final)

    def stop(self) -> None:
        """
        Fail every wait: the broker is stopping.
        """
        self.end_log.flush()
        waiters, self._waiters = self._waiters, {}
        for waiting in waiters.values():
            for d in waiting:
                d.errback(BrokerStopping("the broker is stopping"))
