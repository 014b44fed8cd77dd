"""
Tests for taskbroker.broker.dispatch: the pure matching of tasks to slots.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from taskbroker.broker.dispatch import Dispatcher, Task

HIGH, NORMAL, LOW = 0, 1, 2


def task(task_id, level=NORMAL, handler="echo"):
    return Task(task_id, level, handler)


def test_task_waits_without_credit_then_goes_to_first_credit():
    d = Dispatcher(3)
    d.add_worker("w", [HIGH, NORMAL, LOW], ["echo"], slots=1)
    assert d.add_task(task(1)) is None
    assert len(d) == 1
    a = d.credit("w")
    assert (a.task.id, a.worker.key) == (1, "w")
    assert len(d) == 0


def test_task_goes_at_once_to_ready_worker():
    d = Dispatcher(3)
    d.add_worker("w", [NORMAL], ["echo"], slots=1)
    assert d.credit("w") is None
    a = d.add_task(task(1))
    assert a.worker.key == "w"
    assert d.worker("w").busy == 1 and d.worker("w").credits == 0


def test_credit_takes_most_urgent_level_first_then_fifo():
    d = Dispatcher(3)
    d.add_worker("w", [HIGH, NORMAL, LOW], ["echo", "sleep"], slots=1)
    d.add_task(task(1, LOW))
    d.add_task(task(2, NORMAL, "sleep"))
    d.add_task(task(3, NORMAL, "echo"))
    d.add_task(task(4, HIGH, "sleep"))
    order = []
    for _ in range(4):
        a = d.credit("w")
        order.append(a.task.id)
        d.task_done("w")
    assert order == [4, 2, 3, 1]


def test_only_tasks_the_worker_can_run():
    d = Dispatcher(3)
    d.add_worker("w", [NORMAL], ["echo"], slots=2)
    d.add_task(task(1, HIGH, "echo"))  # level not served
    d.add_task(task(2, NORMAL, "resize"))  # handler missing
    assert d.credit("w") is None
    assert d.worker("w").credits == 1
    assert len(d) == 2
    # A task it can run goes at once, past the ones it cannot.
    assert d.add_task(task(3, NORMAL, "echo")).worker.key == "w"


def test_prefers_the_least_capable_worker():
    d = Dispatcher(3)
    d.add_worker("general", [HIGH, NORMAL, LOW], ["echo"], slots=1)
    d.add_worker("reserved", [HIGH], ["echo"], slots=1)
    d.add_worker("normal-low", [NORMAL, LOW], ["echo"], slots=1)
    for key in ("general", "reserved", "normal-low"):
        d.credit(key)
    # A high task goes to the reserved worker, keeping general capacity.
    assert d.add_task(task(1, HIGH)).worker.key == "reserved"
    # A low task goes to the worker whose most urgent level is least urgent.
    assert d.add_task(task(2, LOW)).worker.key == "normal-low"
    assert d.add_task(task(3, HIGH)).worker.key == "general"


def test_prefers_fewest_levels_then_least_recently_ready():
    d = Dispatcher(3)
    d.add_worker("a", [NORMAL, LOW], ["echo"], slots=1)
    d.add_worker("b", [NORMAL], ["echo"], slots=1)
    d.add_worker("c", [NORMAL], ["echo"], slots=1)
    d.credit("a")
    d.credit("c")
    d.credit("b")
    assert d.add_task(task(1)).worker.key == "c"
    assert d.add_task(task(2)).worker.key == "b"
    assert d.add_task(task(3)).worker.key == "a"


def test_least_recently_ready_across_classes_of_equal_rank():
    d = Dispatcher(2)
    d.add_worker("x", [0], ["echo", "a"], slots=1)
    d.add_worker("y", [0], ["echo", "b"], slots=1)
    d.credit("y")
    d.credit("x")
    assert d.add_task(task(1, 0)).worker.key == "y"


def test_credits_beyond_slots_are_dropped_and_counted():
    d = Dispatcher(3)
    d.add_worker("w", [NORMAL], ["echo"], slots=2)
    d.credit("w")
    d.credit("w")
    d.credit("w")
    assert d.worker("w").credits == 2
    assert d.dropped_credits == 1
    d.credit("unknown")
    assert d.dropped_credits == 2


def test_busy_slots_count_against_credits():
    d = Dispatcher(3)
    d.add_worker("w", [NORMAL], ["echo"], slots=1)
    d.add_task(task(1))
    d.credit("w")
    assert d.credit("w") is None
    assert d.dropped_credits == 1
    d.task_done("w")
    d.credit("w")
    assert d.worker("w").credits == 1


def test_re_announced_worker_keeps_its_running_tasks_busy():
    d = Dispatcher(3)
    d.add_worker("w", [NORMAL], ["echo"], slots=2, busy=2)
    d.credit("w")
    assert d.worker("w").credits == 0


def test_removed_worker_credits_are_dropped():
    d = Dispatcher(3)
    d.add_worker("w", [NORMAL], ["echo"], slots=2)
    d.credit("w")
    d.credit("w")
    d.remove_worker("w")
    assert d.add_task(task(1)) is None
    assert not d.served("echo")
    d.add_worker("v", [NORMAL], ["echo"], slots=1)
    assert d.credit("v").task.id == 1


def test_missing_handler_waits_and_does_not_block_others():
    d = Dispatcher(3)
    d.add_task(task(1, NORMAL, "resize"))
    d.add_worker("w", [NORMAL], ["echo"], slots=1)
    d.add_task(task(2, NORMAL, "echo"))
    assert d.credit("w").task.id == 2
    assert (d.waiting(NORMAL, "resize"), d.waiting(NORMAL, "echo")) == (1, 0)
    assert not d.served("resize")
    d.add_worker("r", [NORMAL], ["resize"], slots=1)
    assert d.credit("r").task.id == 1


def test_remove_task():
    d = Dispatcher(3)
    d.add_task(task(1))
    d.add_task(task(2))
    assert d.remove_task(1).id == 1
    assert d.remove_task(1) is None
    d.add_worker("w", [NORMAL], ["echo"], slots=1)
    assert d.credit("w").task.id == 2


def test_front_insert_goes_first():
    d = Dispatcher(3)
    d.add_task(task(1))
    d.add_task(task(2), front=True)
    d.add_task(task(3, NORMAL, "other"))
    d.add_worker("w", [NORMAL], ["echo", "other"], slots=1)
    assert d.credit("w").task.id == 2


def test_class_index_follows_workers():
    d = Dispatcher(3)
    d.add_worker("w", [NORMAL], ["echo"], slots=1)
    d.remove_worker("w")
    assert d._classes == {} and d._able == {}
    d.add_worker("w", [NORMAL], ["echo"], slots=1)
    d.add_worker("w", [LOW], ["echo"], slots=1)  # re-announce replaces
    assert list(d.workers())[0].levels == (LOW,)
    assert len(d._classes) == 1


# Random event sequences: the dispatcher's invariants always hold.

events = st.lists(
    st.one_of(
        st.tuples(st.just("task"), st.integers(0, 2), st.sampled_from("ab")),
        st.tuples(st.just("credit"), st.integers(0, 3)),
        st.tuples(st.just("done"), st.integers(0, 3)),
        st.tuples(st.just("lose"), st.integers(0, 3)),
        st.tuples(st.just("join"), st.integers(0, 3)),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
    ),
    max_size=80,
)

CAPABILITIES = [
    ([0, 1, 2], {"a", "b"}, 2),
    ([0], {"a", "b"}, 1),
    ([1, 2], {"a"}, 1),
    ([2], {"b"}, 3),
]


@settings(max_examples=300)
@given(events)
def test_invariants_under_random_events(sequence):
    d = Dispatcher(3)
    ids = iter(range(10**6))
    running = {}  # task id -> worker key
    assigned = set()
    waiting = {}

    def apply(assignment):
        if assignment is None:
            return
        t, w = assignment.task, assignment.worker
        assert t.id not in assigned, "task assigned twice"
        assert t.level in w.levels and t.handler in w.handlers
        assert w.busy <= w.slots
        assigned.add(t.id)
        waiting.pop(t.id, None)
        running[t.id] = w.key

    for event in sequence:
        kind = event[0]
        if kind == "task":
            t = task(next(ids), event[1], event[2])
            waiting[t.id] = t
            apply(d.add_task(t))
        elif kind == "credit":
            apply(d.credit(event[1]))
        elif kind == "done":
            for tid, key in list(running.items()):
                if key == event[1]:
                    del running[tid]
                    d.task_done(key)
                    break
        elif kind == "lose":
            if d.remove_worker(event[1]) is not None:
                for tid, key in list(running.items()):
                    if key == event[1]:
                        del running[tid]
                        assigned.discard(tid)
                        t = task(tid, 0, "a")
                        waiting[tid] = t
                        apply(d.add_task(t, front=True))
        elif kind == "join":
            levels, handlers, slots = CAPABILITIES[event[1]]
            if d.worker(event[1]) is None:
                d.add_worker(event[1], levels, handlers, slots)
        elif kind == "cancel":
            if d.remove_task(event[1]) is not None:
                del waiting[event[1]]

        # No credit idles while a task it could run waits.
        for w in d.workers():
            if w.credits:
                for t in waiting.values():
                    assert not (
                        t.level in w.levels and t.handler in w.handlers
                    )
            assert w.busy + w.credits <= w.slots
        assert len(d) == len(waiting)


def test_pause_queues_everything_and_resume_matches():
    d = Dispatcher(3)
    d.add_worker("w", [NORMAL], ["echo"], slots=2)
    d.paused = True
    assert d.credit("w") is None
    assert d.add_task(task(1)) is None
    assert d.add_task(task(2, LOW)) is None  # not served by w
    assignments = d.resume()
    assert [(a.task.id, a.worker.key) for a in assignments] == [(1, "w")]
    assert d.worker("w").credits == 0 and d.worker("w").busy == 1
    assert d.add_task(task(3)) is None  # no credit left
    assert d.credit("w").task.id == 3
