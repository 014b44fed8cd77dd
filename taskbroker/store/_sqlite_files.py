# -*- test-case-name: tests.unit.test_store_sqlite_faults -*-
"""
The SQLite store's files, apart from SQL: the ownership lock, the checks
made before the database is opened (may this process write it, and is a
missing database new or lost?), and the watch on the files it opened.

An open connection goes on working in a database file that was deleted or
replaced, and SQLite never notices: without the watch, the broker would
acknowledge writes that nobody could ever read again.
"""

import fcntl
import os
import pwd
import sqlite3
from urllib.request import pathname2url

from twisted.logger import Logger

from taskbroker.errors import StoreError, StoreLocked, StoreLost

__all__ = [
    "FileWatch",
    "check_may_create",
    "check_writable",
    "connect_existing",
    "leave_lock",
    "lock",
    "lock_path",
]

log = Logger()

#: The files SQLite keeps next to a database in WAL mode.
SIDE_FILES = ("-wal", "-shm")


def lock_path(path):
    return path + ".lock"


def lock(path):
    """
    Take the ownership lock of the database at ``path``.

    :returns: the lock file's descriptor; closing it releases the lock.
    :raises StoreLocked: if another process (or another store in this one)
        holds it.
    """
    lock_file = lock_path(path)
    try:
        # os.open makes the descriptor close-on-exec, so processes the
        # broker spawns cannot keep the lock alive after the broker dies.
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StoreError(
            f"cannot open lock file {lock_file}: {e.strerror}"
        ) from e
    try:
        # flock, not fcntl locks: an flock belongs to this open file, so a
        # second store in the same process is refused too, and closing any
        # other descriptor of the file does not drop it.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = os.read(fd, 64).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        # The owner writes its pid just after locking; it may not be there yet.
        if not owner.isdigit():
            owner = "unknown"
        raise StoreLocked(
            f"database {path} is in use by another broker (pid {owner})"
        ) from None
    except OSError as e:
        os.close(fd)
        raise StoreError(f"cannot lock {lock_file}: {e.strerror}") from e
    _write_pid(fd, lock_file)
    return fd


def _write_pid(fd, lock_file):
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    except OSError:
        # The pid is only shown in the other broker's error message.
        log.failure(
            "could not write the pid into {lock_path}", lock_path=lock_file
        )


def leave_lock(path):
    """
    Put a lock file back where a lost one was, once the store has let go
    of the database, so that the next start refuses to create an empty
    database in place of a lost one (see :func:`check_may_create`).
    """
    lock_file = lock_path(path)
    try:
        fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    except OSError as e:
        log.warn(
            "could not put back the lock file {lock_path}: {error}",
            lock_path=lock_file,
            error=e.strerror,
        )
        return
    try:
        _write_pid(fd, lock_file)
    finally:
        os.close(fd)


def check_may_create(path, create):
    """
    Refuse to create the database where its lock file says one was.

    :param create: whether the operator allowed it (``--create-database``).
    :returns: whether the database is to be created.
    :raises StoreError: if the database is missing, its lock file is not,
        and ``create`` is false.
    """
    if os.path.exists(path):
        return False
    if create or not os.path.exists(lock_path(path)):
        return True
    raise StoreError(
        f"database {path} does not exist, but its lock file "
        f"{lock_path(path)} does: the database was probably deleted or "
        "moved; put it back, or start the broker with --create-database "
        "to begin with an empty one"
    )


def check_writable(path):
    """
    Make sure that this process can write the database, its folder and
    the WAL files already there.  SQLite opens what it cannot write read
    only, without a word, and then fails every write with "attempt to
    write a readonly database", which names none of them.

    :raises StoreError: naming the first file that cannot be written.
    """
    directory = os.path.dirname(path)
    # access(), not a test open: closing a descriptor of the database
    # would drop the fcntl locks of every connection this process has to
    # it.
    if not _may_write(directory, os.W_OK | os.X_OK):
        raise _not_writable(directory, "cannot create files in folder")
    for name in (path, *(path + suffix for suffix in SIDE_FILES)):
        if os.path.exists(name) and not _may_write(name, os.W_OK):
            raise _not_writable(name, "cannot write")


def _may_write(path, mode):
    return os.access(path, mode, effective_ids=True)


def _read_only_mount(path):
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return None


def _not_writable(path, doing):
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    reason = _read_only_mount(path) or "permission denied"
    return StoreError(
        f"{doing} {path} as user {user}: {reason}; the broker must be able "
        "to write its database, the folder it is in, and the -wal and -shm "
        "files next to it"
    )


def connect_existing(path, **kwargs):
    """
    ``sqlite3.connect`` that never creates the database: a connection
    opened after the file was deleted must fail, not start an empty one.
    """
    uri = "file:" + pathname2url(path) + "?mode=rw"
    return sqlite3.connect(uri, uri=True, **kwargs)


class FileWatch:
    """
    The files a store opened, by device and inode, so that it can tell
    when one is removed or replaced: the database and its lock file after
    every group commit (one ``os.stat`` each), and also the -wal and -shm
    files, which SQLite keeps while any connection is open, once in a
    while.

    Made and checked in a database thread, once the store has written.

    :param path: the database's absolute path.
    :param lock_fd: the descriptor of its lock file, as :func:`lock`
        returned it.
    """

    def __init__(self, path, lock_fd):
        self._often = (
            ("database", path, _identity(os.stat(path))),
            ("lock file", lock_path(path), _identity(os.fstat(lock_fd))),
        )
        self._all = self._often + tuple(
            ("file", path + suffix, _identity(os.stat(path + suffix)))
            for suffix in SIDE_FILES
            if os.path.exists(path + suffix)
        )

    def check(self):
        """
        Look at the database and its lock file.

        :raises StoreLost: if a file is no longer at its path, or another
            file is.  Any other error of ``stat`` proves nothing and is
            ignored.
        """
        _check(self._often)

    def check_all(self):
        """
        Look at the -wal and -shm files too; see :meth:`check`.
        """
        _check(self._all)


def _check(files):
    for what, path, expected in files:
        try:
            found = _identity(os.stat(path))
        except (FileNotFoundError, NotADirectoryError):
            raise StoreLost(
                f"{what} {path} was removed while the broker was using it"
            ) from None
        except OSError:
            continue
        if found != expected:
            raise StoreLost(
                f"{what} {path} was replaced while the broker was using it "
                f"(device {expected[0]} inode {expected[1]}, now device "
                f"{found[0]} inode {found[1]})"
            )


def _identity(stat):
    return (stat.st_dev, stat.st_ino)
