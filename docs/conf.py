"""
Sphinx configuration for taskbroker's documentation.

Build with ``make docs`` (it installs the ``docs`` extra, then runs
``sphinx-build -W`` into ``docs/_build/html``).  Nothing here is needed to
run the tests.
"""

import os
import socket
import sys
from urllib.parse import urlsplit

# The documented package is the one in this checkout, installed or not.
sys.path.insert(
    0, os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
)

import taskbroker  # noqa: E402

project = "taskbroker"
copyright = "taskbroker contributors"
version = release = taskbroker.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    # zope.interface interfaces: autodoc alone skips them.
    "repoze.sphinx.autointerface",
]

exclude_patterns = ["_build"]
root_doc = "index"
pygments_style = "sphinx"

html_theme = "alabaster"
html_static_path = []
html_theme_options = {
    "description": "Durable, priority-aware task distribution"
}

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Docstrings use Sphinx field lists (:param x:, :returns:), not type hints.
autodoc_typehints = "none"


def _reachable(url, timeout=3.0):
    """
    Whether the host of ``url`` accepts a connection: intersphinx reports
    an unreachable inventory as a warning, which ``-W`` turns into a failed
    build, so offline builds leave the links out instead.
    """
    parts = urlsplit(url)
    try:
        socket.create_connection(
            (parts.hostname, parts.port or 443), timeout=timeout
        ).close()
    except OSError:
        return False
    return True


_INVENTORIES = {
    # Twisted's API reference is made by pydoctor, which writes an
    # intersphinx inventory next to it.
    "twisted": "https://docs.twisted.org/en/stable/api/",
    "python": "https://docs.python.org/3/",
}

intersphinx_mapping = {}
for _name, _url in _INVENTORIES.items():
    if _reachable(_url):
        intersphinx_mapping[_name] = (_url, None)
    else:
        print(
            f"intersphinx: {_url} is unreachable; building without links "
            f"to the {_name} documentation"
        )
intersphinx_timeout = 10
