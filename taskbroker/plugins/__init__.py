"""
taskbroker's plugin package: task handlers are found here.

Twisted's "alternate plugin package" convention: this package's path is
extended with every ``taskbroker/plugins`` directory on ``sys.path``, and
the worker appends each ``--handlers-path`` folder to it.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__ = []
