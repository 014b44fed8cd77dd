# -*- test-case-name: tests.unit.test_curve -*-
"""
CURVE keys: making them, and reading them safely.

A key pair is two files in the format of pyzmq's ``zmq.auth`` (and of
CZMQ): ``NAME.key`` holds the public key, ``NAME.key_secret`` the public
and the secret key.  A broker is given its own secret file and folders of
public files, one per peer it admits (as Salt keeps accepted minion
keys); a worker or a client is given its own secret file and the broker's
public file.  Keys are handled as their 40-character Z85 text, as ZeroMQ's
socket options take them.

Every problem is a :class:`~taskbroker.errors.ConfigError` with one line
naming the file.
"""

import datetime
import os
import re
import stat

import zmq
import zmq.auth

from taskbroker.config import check_curve_pair
from taskbroker.errors import ConfigError

#: The oldest libzmq whose CURVE the project trusts: 4.3.2 fixed a flaw
#: that let a peer with no valid key crash a CURVE server (CVE-2019-13132).
MIN_LIBZMQ = (4, 3, 2)
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
_Z85_KEY = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}\Z")

_BANNER = """#   ****  Generated on {now} by taskbroker keygen  ****
#   ZeroMQ CURVE {what} Certificate
#   {advice}
"""


def check_support():
    """
    :raises ConfigError: if this libzmq cannot do CURVE safely.
    """
    version = zmq.zmq_version_info()
    if version < MIN_LIBZMQ or not zmq.has("curve"):
        raise ConfigError(
            "CURVE needs libzmq >= "
            + ".".join(map(str, MIN_LIBZMQ))
            + " built with CURVE; this "
            f"one is {zmq.zmq_version()}"
            + ("" if zmq.has("curve") else " without CURVE")
        )


def keygen(folder, name):
    """
    Make a key pair: ``NAME.key`` (readable by all) and ``NAME.key_secret``
    (readable by its owner only) in ``folder``, which is made if missing.

    :returns: the paths of the public and the secret file.
    :raises ConfigError: for a bad name, or if either file exists (a key
        is never overwritten).
    """
    check_support()
    if not _NAME.match(name):
        raise ConfigError(
            f"--name: {name!r} is not a key name (1 to 100 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit)"
        )
    public_path = os.path.join(folder, name + PUBLIC_SUFFIX)
    secret_path = os.path.join(folder, name + SECRET_SUFFIX)
    for path in (public_path, secret_path):
        if os.path.lexists(path):
            raise ConfigError(
                f"{path}: exists; a key is never overwritten "
                "(remove it first to replace it)"
            )
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{folder}: cannot make the folder: {e.strerror}"
        ) from None
    public, secret = zmq.curve_keypair()
    now = datetime.datetime.now().isoformat(timespec="seconds")
    # The secret first: a public file alone, left by a failure, is
    # harmless.
    _write_new(
        secret_path,
        0o600,
        _BANNER.format(
            now=now,
            what="**Secret**",
            advice="DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its "
            "permissions.",
        )
        + _curve_section(public, secret),
    )
    _write_new(
        public_path,
        0o644,
        _BANNER.format(
            now=now,
            what="Public",
            advice="Give this file to the peers that must admit this key.",
        )
        + _curve_section(public),
    )
    return public_path, secret_path


def _curve_section(public, secret=None):
    text = "metadata\ncurve\n" + f'    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text


def _write_new(path, mode, text):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(
            f"{path}: exists; a key is never overwritten "
            "(remove it first to replace it)"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot write: {e.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
    # The umask may have taken permissions away, never added them.
    os.chmod(path, mode)


def load_secret(path, option):
    """
    Read a key pair from a secret file.

    :param option: how the user named the file (``--curve-secret-key``),
        for the message.
    :returns: ``(public, secret)``, Z85 ``bytes`` each.
    :raises ConfigError: if the file is missing, readable by others than
        its owner, or holds no valid pair.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ConfigError(f"{option}: {path}: {e.strerror}") from None
    # Read before the mode is judged: a public file, readable by all as
    # it should be, is the wrong file, and chmod would not help.
    public, secret = _read(path, option)
    if secret is None:
        raise ConfigError(
            f"{option}: {path}: no secret key in it (a public "
            f"{PUBLIC_SUFFIX} file? the secret one ends in {SECRET_SUFFIX})"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{option}: {path}: a secret key readable by others (mode "
            f"{stat.S_IMODE(mode):o}) is refused; chmod 600 {path}"
        )
    if zmq.curve_public(secret) != public:
        raise ConfigError(
            f"{option}: {path}: its public and secret keys "
            "do not belong together"
        )
    return public, secret


def load_public(path, option):
    """
    Read a public key from a key file (public or secret).

    :returns: the public key, Z85 ``bytes``.
    :raises ConfigError: if the file is missing or holds no valid key.
    """
    return _read(path, option)[0]


def _read(path, option):
    try:
        # pyzmq reports a missing file with no errno.
        os.stat(path)
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or "no public key in it"
        raise ConfigError(f"{option}: {path}: {reason}") from None
    for key in (public, secret):
        if key is not None and not _Z85_KEY.match(key):
            raise ConfigError(
                f"{option}: {path}: not a CURVE key file "
                "(a key is 40 characters of Z85)"
            )
    return public, secret


def load_peer_keys(
    server_path,
    secret_path,
    peer,
    server_option="--curve-server-key",
    secret_option="--curve-secret-key",
):
    """
    The keys of a worker or a client: the broker's public key, and its own
    key pair.

    :param server_path: the broker's public key file, or ``None``.
    :param secret_path: the peer's secret key file, or ``None``; both or
        neither.
    :param peer: ``"worker"`` or ``"client"``, for the messages.
    :param server_option: how the user named ``server_path``, for the
        messages; likewise ``secret_option``.
    :returns: ``None`` without CURVE (neither file), else ``(server,
        public, secret)``, Z85 ``bytes`` each, as
        :func:`taskbroker.transport.options.curve_client_options` takes
        them.
    :raises ConfigError: one file without the other, a libzmq without
        CURVE, a file :func:`load_secret` or :func:`load_public` refuses,
        or a secret file as the broker's key (the broker's secret belongs
        on the broker's hosts only).
    """
    check_curve_pair(
        server_path, secret_path, server_option, secret_option, peer
    )
    if server_path is None:
        return None
    check_support()
    public, secret = load_secret(secret_path, secret_option)
    server, server_secret = _read(server_path, server_option)
    if server_secret is not None:
        raise ConfigError(
            f"{server_option}: {server_path}: holds a secret key; give the "
            f"broker's public {PUBLIC_SUFFIX} file, and keep its secret on "
            "the broker"
        )
    return server, public, secret


def load_folder(folder, option):
    """
    Read the public keys of a folder: every ``*.key`` file in it.

    :returns: ``(keys, problems)``: a ``dict`` of public key (Z85
        ``bytes``) to the name of its file (without ``.key``), and a
        ``dict`` of that name to one line for each file that could not be
        read, which is left out.
    :raises ConfigError: if the folder cannot be read.
    """
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise ConfigError(f"{option}: {folder}: {e.strerror}") from None
    keys, problems = {}, {}
    for name in names:
        if not name.endswith(PUBLIC_SUFFIX):
            continue
        try:
            key = load_public(os.path.join(folder, name), option)
        except ConfigError as e:
            problems[name[: -len(PUBLIC_SUFFIX)]] = str(e)
            continue
        keys[key] = name[: -len(PUBLIC_SUFFIX)]
    return keys, problems
