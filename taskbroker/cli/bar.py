# -*- test-case-name: tests.unit.test_cli -*-
"""
The live progress bar of ``wait`` and ``submit --wait``: on a terminal's
standard error only, so that standard output keeps just the results, and
none at all when standard error is not a terminal (a pipe, a file, a
service's log).  Drawn with tqdm.
"""

import time
from datetime import datetime

from tqdm import tqdm

#: Seconds between two looks at a task that is waited for with a bar.
LOOK_EVERY = 1.0


def shown_on(stream):
    """
    Whether a bar would show on ``stream``.
    """
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class _Tqdm(tqdm):
    """
    A tqdm bar followed by a line of text of our own (``state``).
    """

    state = ""

    @property
    def format_dict(self):
        return dict(super().format_dict, state=self.state)


class Bar:
    """
    One bar on ``stream``, for one task (its handler's progress) or for
    several (how many have ended).
    """

    def __init__(self, stream, total_tasks):
        self._tasks = total_tasks
        # mininterval=0: it is drawn when told, once a second at most.
        self._bar = _Tqdm(
            total=total_tasks if total_tasks > 1 else 100,
            file=stream,
            leave=False,
            dynamic_ncols=True,
            mininterval=0,
            bar_format="{desc}{percentage:3.0f}%|{bar}| {state}",
        )

    def task(self, task):
        """
        Show how far one task has got: its state, attempt, the handler's
        progress and message, or how long until its retry.
        """
        progress = task.get("progress") or {}
        fraction = progress.get("fraction")
        if task.get("state") != "running" or not isinstance(
            fraction, (int, float)
        ):
            fraction = 0
        self._bar.n = round(100 * min(max(fraction, 0), 1), 1)
        self._bar.state = _state(task)
        self._bar.set_description_str(f"task {task.get('id')} ")

    def ended(self, done):
        """
        Show how many of the tasks have ended.
        """
        self._bar.n = done
        self._bar.set_description_str(f"{done}/{self._tasks} tasks ")
        self._bar.refresh()

    def clear(self):
        """
        Take the bar off the screen, for a line of output.
        """
        self._bar.clear()

    def close(self):
        self._bar.close()


def _state(task):
    """
    ``attempt 2 of 3: resizing page 4``, ``attempt 2 of 3, retry in
    1.9 s``, ``queued``...
    """
    state = task.get("state")
    attempts, most = task.get("attempts"), task.get("max_attempts")
    if state == "running":
        text = f"attempt {attempts} of {most}"
        message = (task.get("progress") or {}).get("message")
        return text + (f": {message}" if message else "")
    if state == "queued":
        due = _seconds_until(task.get("run_at"))
        if attempts and due is not None:
            return f"attempt {attempts + 1} of {most}, retry in {due:.1f} s"
        if due is not None:
            return f"queued, runs in {due:.1f} s"
        return "queued, waiting for a worker"
    return str(state)


def _seconds_until(when):
    if not isinstance(when, str):
        return None
    try:
        left = datetime.fromisoformat(when).timestamp() - time.time()
    except ValueError:
        return None
    return left if left > 0 else None
