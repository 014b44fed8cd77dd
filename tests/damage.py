"""
Damaging a SQLite file as a failing disk might, for the tests of what the
broker does about it.
"""

import os
import sqlite3
from contextlib import closing


def damage_index_pages(path, count=3):
    """
    Overwrite ``count`` index pages in the middle third of the file with
    garbage, as a failing disk might; the table's own pages stay intact.

    :returns: the page numbers overwritten.
    """
    with closing(sqlite3.connect(path)) as connection:
        (page_size,) = connection.execute("PRAGMA page_size").fetchone()
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
    chosen = []
    with open(path, "r+b") as f:
        for page in range(pages // 3, 2 * pages // 3):
            f.seek((page - 1) * page_size)
            if f.read(1) == b"\x0a":  # a leaf page of an index
                chosen.append(page)
        chosen = chosen[:count]
        assert chosen, "no index page in the middle of the file"
        for page in chosen:
            f.seek((page - 1) * page_size)
            f.write(os.urandom(page_size))
    return chosen
