"""
Waiting for a process that is not our child to end, without polling.

A pidfd (Linux 5.3+) becomes readable when its process terminates, whether
or not anyone reaps it, so the tests can wait on that event.
"""

import os
import select


def wait_gone(pid, timeout):
    """
    Wait until process ``pid`` has ended (or become a zombie).

    :returns: ``True`` if it ended within ``timeout`` seconds.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)
