"""
taskbroker: durable, priority-aware task distribution over ZeroMQ.
"""

from taskbroker.errors import PermanentFailure

__all__ = ["PermanentFailure", "__version__"]

__version__ = "0.1.0"
