"""
Shared setup for the unit tests: Hypothesis profiles.

``ci`` (selected when ``CI=true``) is reproducible and has no deadline,
because shared CI machines are slow and a flaky deadline proves nothing;
``dev`` keeps Hypothesis' defaults.
"""

import os

from hypothesis import settings

settings.register_profile("ci", deadline=None, derandomize=True)
settings.register_profile("dev")
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")
