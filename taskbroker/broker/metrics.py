# -*- test-case-name: tests.integration.test_http -*-
"""
The broker's Prometheus metrics (``GET /metrics`` on its status site),
made with the official client library in a registry of their own.

A scrape reads only what the broker keeps in memory: it costs the same
with ten tasks in the store or ten million.  ``taskbroker_queue_depth``
and ``taskbroker_tasks_running`` are the whole table's, from the counts
the broker keeps (recounted every minute, with its own changes applied
as it makes them); everything else is this broker's own, since it
started: what it dispatched and ended, its workers and their slots.

Handler names become labels only for handlers some worker serves, at most
:data:`MOST_HANDLERS` of them; the rest are counted under ``_other``, so
that a table full of odd handler names cannot flood the scrape.
"""

from bisect import bisect_left
from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

#: The most handler names labelled; the others are counted as OTHER.
MOST_HANDLERS = 200
OTHER = "_other"

#: Histogram buckets (seconds): tasks wait from milliseconds to an hour,
#: and run from milliseconds to twenty minutes and more.
WAIT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)
RUN_BUCKETS = (
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1200,
    3600,
)

OUTCOMES = ("succeeded", "failed", "cancelled")


class _Histogram:
    """
    Observations by label, in buckets: a few operations an observation,
    made cumulative only when scraped.
    """

    def __init__(self, buckets):
        self.buckets = buckets
        # labels -> [count in each bucket..., past the last], sum
        self.counts = {}
        self.sums = Counter()

    def observe(self, labels, value):
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.buckets) + 1)
        counts[bisect_left(self.buckets, value)] += 1
        self.sums[labels] += value

    def family(self, name, help, label_of):
        family = HistogramMetricFamily(
            name, help, labels=("priority", "handler")
        )
        merged, sums = {}, Counter()
        for (level, handler), counts in self.counts.items():
            labels = (level, label_of(handler))
            into = merged.setdefault(labels, [0] * len(counts))
            for i, n in enumerate(counts):
                into[i] += n
            sums[labels] += self.sums[(level, handler)]
        for labels, counts in sorted(merged.items()):
            cumulative, total = [], 0
            for bound, n in zip(self.buckets + (float("inf"),), counts):
                total += n
                cumulative.append((floatToGoString(bound), total))
            family.add_metric(labels, cumulative, sums[labels])
        return family


class Metrics:
    """
    What the broker counts for ``/metrics``, and the collector that
    reports it.

    :param broker: the :class:`taskbroker.broker.core.Broker`.
    """

    def __init__(self, broker):
        self._broker = broker
        self._finished = Counter()
        self._purged = 0
        # The handler names kept as themselves (see _kept).
        self._seen = set()
        self._wait = _Histogram(WAIT_BUCKETS)
        self._run = _Histogram(RUN_BUCKETS)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def _kept(self, handler):
        """
        The handler as the broker keeps its figures: itself, while few
        names are kept, else OTHER.
        """
        if handler in self._seen or len(self._seen) < MOST_HANDLERS:
            self._seen.add(handler)
            return handler
        return OTHER

    def dispatched(self, priority, handler, waited):
        """
        A task was dispatched after ``waited`` seconds since it was made.
        """
        if isinstance(waited, (int, float)) and waited >= 0:
            self._wait.observe((priority, self._kept(handler)), waited)

    def ended(self, priority, handler, outcome, ran=None):
        """
        A task ended (``ran`` seconds its last attempt ran, if known).
        """
        handler = self._kept(handler)
        self._finished[(priority, handler, outcome)] += 1
        if isinstance(ran, (int, float)) and ran >= 0:
            self._run.observe((priority, handler), ran)

    def purged(self, count):
        """
        ``count`` finished tasks were deleted (retention or a purge).
        """
        self._purged += count

    def render(self):
        """
        :returns: the text format (``bytes``) of a scrape.
        """
        return generate_latest(self.registry)

    def collect(self):
        """
        The metric families, for the registry (prometheus_client's
        collector interface).
        """
        broker = self._broker
        served = set(
            sorted(broker.dispatcher.served_handlers())[:MOST_HANDLERS]
        )

        def label_of(handler):
            return handler if handler in served else OTHER

        by_state = {"queued": Counter(), "running": Counter()}
        for (state, level, handler), n in broker.status.tasks.items():
            if state in by_state and n > 0:
                by_state[state][(level, label_of(handler))] += n
        for name, state, help in (
            (
                "taskbroker_queue_depth",
                "queued",
                "Queued tasks (the whole table, delayed ones included).",
            ),
            (
                "taskbroker_tasks_running",
                "running",
                "Running tasks (the whole table).",
            ),
        ):
            family = GaugeMetricFamily(
                name, help, labels=("priority", "handler")
            )
            for labels, n in sorted(by_state[state].items()):
                family.add_metric(labels, n)
            yield family

        finished = CounterMetricFamily(
            "taskbroker_tasks_finished",
            "Tasks this broker ended.",
            labels=("priority", "handler", "outcome"),
        )
        merged = Counter()
        for (level, handler, outcome), n in self._finished.items():
            merged[(level, label_of(handler), outcome)] += n
        for labels, n in sorted(merged.items()):
            finished.add_metric(labels, n)
        yield finished
        yield self._wait.family(
            "taskbroker_task_wait_seconds",
            "From a task's creation to this broker's dispatch of it.",
            label_of,
        )
        yield self._run.family(
            "taskbroker_task_run_seconds",
            "How long the attempts this broker ended ran.",
            label_of,
        )

        yield GaugeMetricFamily(
            "taskbroker_workers",
            "Workers connected to this broker.",
            value=len(broker.sessions),
        )
        slots = GaugeMetricFamily(
            "taskbroker_worker_slots",
            "The slots of this broker's workers.",
            labels=("state",),
        )
        total = broker.sessions.total_slots()
        free = broker.dispatcher.free_credits()
        slots.add_metric(("busy",), max(0, total - free))
        slots.add_metric(("free",), free)
        yield slots
        yield CounterMetricFamily(
            "taskbroker_tasks_deleted",
            "Finished tasks this broker deleted (retention and purges).",
            value=self._purged,
        )
        yield CounterMetricFamily(
            "taskbroker_bad_messages",
            "Messages this broker could not read (protocol errors).",
            value=broker.counters["protocol_errors"],
        )
