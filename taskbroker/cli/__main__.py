"""
``python -m taskbroker.cli``: the ``taskbroker`` command.
"""

from taskbroker.cli import main

main()
