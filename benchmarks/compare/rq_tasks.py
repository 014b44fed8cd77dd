"""
The RQ side of the comparison: one no-op job function.  Runs in the
comparison virtualenv (never imports taskbroker).
"""

import time


def noop(i):
    """
    Does nothing; returns when it ran (Unix time), for submit->start.
    """
    return time.time()
