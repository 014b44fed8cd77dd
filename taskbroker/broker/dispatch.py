# -*- test-case-name: tests.unit.test_dispatch -*-
"""
The dispatcher: which waiting task goes to which free worker slot.

Pure logic, no I/O and no clock: events go in (a task arrived, a credit
arrived, a worker came or went, a task was withdrawn) and assignments come
out.  The broker service turns those into store writes and messages.

The rules:

- A task goes at once to a ready credit of a worker that serves its level
  and has its handler.  When several workers qualify, prefer the one whose
  most urgent level is least urgent, then the one serving fewest levels,
  then the least recently ready: capacity that can serve urgent work stays
  free for it.
- A credit takes the oldest task its worker can run from the most urgent
  level that has one.
- Hence the invariant: no credit waits while a task it could run waits.

Costs: tasks wait in FIFO queues keyed by (level, handler), and credits in
FIFO queues per *capability class*, the set of workers with the same levels
and handlers.  An event costs O(levels x handlers) or O(classes able to run
the task), never O(workers) or O(queued tasks).
"""

from collections import OrderedDict
from collections.abc import Hashable, Iterable, ValuesView
from dataclasses import dataclass, field
from itertools import count
from typing import Any, cast


@dataclass(eq=False)
class _Class:
    """
    Workers with the same capabilities, and their ready credits in the
    order they arrived.
    """

    levels: frozenset[int]
    handlers: frozenset[str]
    # Preference among classes able to run a task: least urgent "most
    # urgent level" first, then fewest levels.
    rank: tuple[int, int]
    members: int = 0
    # credit seq -> the worker whose credit it is
    ready: OrderedDict[int, "WorkerSlots"] = field(default_factory=OrderedDict)


@dataclass(eq=False)
class WorkerSlots:
    """
    What the dispatcher knows of one worker.

    :ivar key: the caller's key for the worker (its identity).
    :ivar busy: tasks assigned and not yet finished.
    :ivar credits: credits waiting for a task.
    """

    key: Hashable
    levels: tuple[int, ...]
    handlers: frozenset[str]
    slots: int
    busy: int = 0
    credits: int = 0
    # Set by Dispatcher.add_worker as soon as it makes the worker: every
    # worker the dispatcher holds has its class.
    _class: _Class = None  # type: ignore[assignment]
    _credit_seqs: list[int] = field(default_factory=list)


class Task:
    """
    A waiting task as the dispatcher sees it.

    :ivar id: the task's id (hashable, unique).
    :ivar level: its priority level number, 0 the most urgent.
    :ivar handler: its handler name.
    :ivar data: whatever the caller wants to carry along.
    :ivar seq: arrival order, set by the dispatcher: older first.
    """

    __slots__ = ("id", "level", "handler", "data", "seq")

    def __init__(
        self, id: Hashable, level: int, handler: str, data: Any = None
    ) -> None:
        self.id = id
        self.level = level
        self.handler = handler
        self.data = data
        self.seq = 0

    def __repr__(self) -> str:
        return f"Task({self.id!r}, {self.level!r}, {self.handler!r})"


class Assignment:
    """
    A decision: run ``task`` on ``worker``.
    """

    __slots__ = ("task", "worker")

    def __init__(self, task: Task, worker: WorkerSlots) -> None:
        self.task = task
        self.worker = worker

    def __repr__(self) -> str:
        return f"Assignment({self.task!r}, {self.worker.key!r})"


class Dispatcher:
    """
    Matches waiting tasks with ready worker slots.

    :param levels: the number of priority levels; level 0 is the most
        urgent.

    Tasks are :class:`Task` objects.
    """

    def __init__(self, levels: int) -> None:
        self.levels = levels
        # (level, handler) -> OrderedDict(task_id -> task), FIFO.
        self._queues: dict[tuple[int, str], OrderedDict[Hashable, Task]] = {}
        # level -> set of handlers whose queue at that level is non-empty.
        self._waiting_handlers: list[set[str]] = [set() for _ in range(levels)]
        # task_id -> (level, handler)
        self._where: dict[Hashable, tuple[int, str]] = {}
        self._seq = count()
        # Tasks put back at the front are older than any other.
        self._front_seq = count(-1, -1)
        self._classes: dict[tuple[frozenset[int], frozenset[str]], _Class] = {}
        # (level, handler) -> classes able to run such tasks, best first.
        self._able: dict[tuple[int, str], list[_Class]] = {}
        self._workers: dict[Hashable, WorkerSlots] = {}
        # handler -> number of live workers that have it
        self._handler_workers: dict[str, int] = {}
        #: credits refused because the worker had no free slot for them.
        self.dropped_credits = 0
        #: while true, tasks and credits only queue (the store is failing).
        self.paused = False

    # -- queries ---------------------------------------------------------

    def __len__(self) -> int:
        """
        The number of waiting tasks.
        """
        return len(self._where)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._where

    def waiting(self, level: int, handler: str) -> int:
        """
        :returns: the number of tasks waiting in one queue.
        """
        queue = self._queues.get((level, handler))
        return 0 if queue is None else len(queue)

    def served(self, handler: str) -> bool:
        """
        :returns: whether a live worker has this handler.
        """
        return self._handler_workers.get(handler, 0) > 0

    def served_handlers(self) -> list[str]:
        """
        :returns: the names of the handlers live workers have.
        """
        return [
            name for name, count in self._handler_workers.items() if count > 0
        ]

    def worker(self, key: Hashable) -> WorkerSlots | None:
        """
        :returns: the :class:`WorkerSlots` for ``key``, or ``None``.
        """
        return self._workers.get(key)

    def workers(self) -> ValuesView[WorkerSlots]:
        return self._workers.values()

    def free_credits(self) -> int:
        return sum(w.credits for w in self._workers.values())

    def hungry(self) -> list[tuple[frozenset[int], frozenset[str], int]]:
        """
        The credits that wait for a task, by capability class: what a
        broker that claims only for idle credits claims for.  The classes
        come in the order the dispatcher prefers them for a task, so that
        claims made in this order give urgent work to the workers kept
        for it.

        :returns: a ``list`` of ``(levels, handlers, credits)``: the level
            numbers and handler names (``frozenset`` each) the class's
            workers serve, and how many of their credits wait.
        """
        return [
            (klass.levels, klass.handlers, len(klass.ready))
            for klass in sorted(
                self._classes.values(), key=lambda klass: klass.rank
            )
            if klass.ready
        ]

    def take_credits(
        self, levels: frozenset[int], handlers: frozenset[str]
    ) -> list[WorkerSlots]:
        """
        Take every ready credit of one capability class (as
        :meth:`hungry` names it) for tasks not in the dispatcher yet: a
        broker on a shared store claims and dispatches them in one
        transaction.

        :returns: a ``list`` of :class:`WorkerSlots`, one per credit taken
            (one more busy slot each; give it back with :meth:`task_done`
            and :meth:`credit` if no task comes for it), oldest first.
        """
        klass = self._classes.get((levels, handlers))
        if klass is None or self.paused:
            return []
        taken = []
        while klass.ready:
            seq, worker = klass.ready.popitem(last=False)
            worker._credit_seqs.remove(seq)
            worker.credits -= 1
            worker.busy += 1
            taken.append(worker)
        return taken

    def clear_tasks(self) -> list[Task]:
        """
        Withdraw every waiting task (a broker that lost its claims starts
        over).

        :returns: the ``list`` of the tasks withdrawn.
        """
        tasks = [self.remove_task(task_id) for task_id in list(self._where)]
        # Each of them was waiting, so none is None.
        return cast(list[Task], tasks)

    # -- tasks -----------------------------------------------------------

    def add_task(self, task: Task, front: bool = False) -> Assignment | None:
        """
        A task is waiting.

        :param front: put it ahead of the tasks waiting at its level (a
            task coming back from a lost worker).
        :returns: an :class:`Assignment` if a ready worker takes it now,
            else ``None`` (it waits).
        """
        worker = (
            None
            if self.paused
            else self._take_credit(task.level, task.handler)
        )
        if worker is not None:
            worker.busy += 1
            return Assignment(task, worker)
        task.seq = next(self._front_seq) if front else next(self._seq)
        key = (task.level, task.handler)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = OrderedDict()
        queue[task.id] = task
        if front:
            queue.move_to_end(task.id, last=False)
        self._where[task.id] = key
        self._waiting_handlers[task.level].add(task.handler)
        return None

    def claim(self, level: int, handler: str) -> WorkerSlots | None:
        """
        Take a ready credit for a task that is not in the dispatcher yet
        (the broker dispatches a new task in the transaction that inserts
        it), as :meth:`add_task` would for it.

        :returns: the :class:`WorkerSlots` whose credit was taken (one
            more busy slot; give it back with :meth:`task_done` and
            :meth:`credit` if the task is not run after all), or ``None``.
        """
        worker = None if self.paused else self._take_credit(level, handler)
        if worker is not None:
            worker.busy += 1
        return worker

    def remove_task(self, task_id: Hashable) -> Task | None:
        """
        Withdraw a waiting task (cancelled, or taken by someone else).

        :returns: the task, or ``None`` if it was not waiting.
        """
        key = self._where.pop(task_id, None)
        if key is None:
            return None
        queue = self._queues[key]
        task = queue.pop(task_id)
        if not queue:
            self._waiting_handlers[key[0]].discard(key[1])
        return task

    # -- workers ---------------------------------------------------------

    def add_worker(
        self,
        key: Hashable,
        levels: Iterable[int],
        handlers: Iterable[str],
        slots: int,
        busy: int = 0,
    ) -> WorkerSlots:
        """
        A worker announced itself.

        :param levels: the level numbers it serves.
        :param handlers: the handler names it has.
        :param busy: how many tasks it is already running (a worker
            re-announcing itself after a broker restart).
        :returns: its :class:`WorkerSlots`.
        """
        if key in self._workers:
            self.remove_worker(key)
        levels = tuple(sorted(set(levels)))
        handlers = frozenset(handlers)
        worker = WorkerSlots(key, levels, handlers, slots, busy=busy)
        class_key = (frozenset(levels), handlers)
        klass = self._classes.get(class_key)
        if klass is None:
            klass = self._new_class(*class_key)
        klass.members += 1
        worker._class = klass
        self._workers[key] = worker
        for handler in handlers:
            self._handler_workers[handler] = (
                self._handler_workers.get(handler, 0) + 1
            )
        return worker

    def remove_worker(self, key: Hashable) -> WorkerSlots | None:
        """
        A worker left or was lost.  Its credits are dropped; the caller
        requeues the tasks it was running.

        :returns: its :class:`WorkerSlots`, or ``None`` if unknown.
        """
        worker = self._workers.pop(key, None)
        if worker is None:
            return None
        klass = worker._class
        for seq in worker._credit_seqs:
            klass.ready.pop(seq, None)
        worker._credit_seqs.clear()
        worker.credits = 0
        klass.members -= 1
        if klass.members == 0:
            self._drop_class(klass)
        for handler in worker.handlers:
            left = self._handler_workers[handler] - 1
            if left:
                self._handler_workers[handler] = left
            else:
                del self._handler_workers[handler]
        return worker

    def credit(self, key: Hashable) -> Assignment | None:
        """
        A worker has a free slot.

        :returns: an :class:`Assignment` if a waiting task goes to it now;
            ``None`` if the credit waits or was dropped (unknown worker, or
            more credits than free slots: counted in
            :attr:`dropped_credits`).
        """
        worker = self._workers.get(key)
        if worker is None or worker.busy + worker.credits >= worker.slots:
            self.dropped_credits += 1
            return None
        task = None if self.paused else self._take_task(worker)
        if task is not None:
            worker.busy += 1
            return Assignment(task, worker)
        seq = next(self._seq)
        worker.credits += 1
        worker._credit_seqs.append(seq)
        worker._class.ready[seq] = worker
        return None

    def task_done(self, key: Hashable) -> None:
        """
        A task assigned to the worker ended (its slot is free; a credit for
        it comes separately).
        """
        worker = self._workers.get(key)
        if worker is not None and worker.busy > 0:
            worker.busy -= 1

    def resume(self) -> list[Assignment]:
        """
        End a pause: match the credits that queued meanwhile, oldest first.

        :returns: a ``list`` of :class:`Assignment`.
        """
        self.paused = False
        assignments = []
        for klass in list(self._classes.values()):
            for seq, worker in list(klass.ready.items()):
                task = self._take_task(worker)
                if task is None:
                    continue
                del klass.ready[seq]
                worker._credit_seqs.remove(seq)
                worker.credits -= 1
                worker.busy += 1
                assignments.append(Assignment(task, worker))
        return assignments

    # -- internals -------------------------------------------------------

    def _new_class(
        self, levels: frozenset[int], handlers: frozenset[str]
    ) -> _Class:
        rank = (-min(levels, default=self.levels), len(levels))
        klass = _Class(levels, handlers, rank)
        self._classes[(levels, handlers)] = klass
        for level in levels:
            for handler in handlers:
                able = self._able.setdefault((level, handler), [])
                able.append(klass)
                able.sort(key=lambda c: c.rank)
        return klass

    def _drop_class(self, klass: _Class) -> None:
        del self._classes[(klass.levels, klass.handlers)]
        for level in klass.levels:
            for handler in klass.handlers:
                able = self._able[(level, handler)]
                able.remove(klass)
                if not able:
                    del self._able[(level, handler)]

    def _take_credit(self, level: int, handler: str) -> WorkerSlots | None:
        best = None
        for klass in self._able.get((level, handler), ()):
            if not klass.ready:
                continue
            if best is not None and klass.rank != best.rank:
                break
            if best is None or next(iter(klass.ready)) < next(
                iter(best.ready)
            ):
                best = klass
        if best is None:
            return None
        seq, worker = best.ready.popitem(last=False)
        # Credits leave a class's queue in the order they entered, and a
        # worker's credits sit in one class, so this is its oldest one.
        worker._credit_seqs.remove(seq)
        worker.credits -= 1
        return worker

    def _take_task(self, worker: WorkerSlots) -> Task | None:
        handlers = worker.handlers
        for level in worker.levels:
            waiting = self._waiting_handlers[level]
            if not waiting:
                continue
            candidates = (
                waiting & handlers
                if len(waiting) > len(handlers)
                else [h for h in waiting if h in handlers]
            )
            best_queue = None
            best_seq = 0  # read only once best_queue is set
            for handler in candidates:
                queue = self._queues[(level, handler)]
                head = next(iter(queue.values()))
                if best_queue is None or head.seq < best_seq:
                    best_queue, best_seq = queue, head.seq
            if best_queue is not None:
                task_id, task = best_queue.popitem(last=False)
                del self._where[task_id]
                if not best_queue:
                    waiting.discard(task.handler)
                return task
        return None
