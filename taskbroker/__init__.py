"""
taskbroker: durable, priority-aware task distribution over ZeroMQ.
"""

__version__ = "0.1.0"
