# -*- test-case-name: tests.unit.test_curve -*-
"""
Who may do what on a broker with CURVE: the public keys of its
authorization folders, by role.

A key in ``--authorized-workers`` may register as a worker and run tasks;
a key in ``--authorized-clients`` may submit tasks and manage its own; a
key in ``--admin-clients`` may do what a client key does, to every task,
and see the workers; a key in several folders has each role.  ZAP admits a
connection whose key is in any (:mod:`taskbroker.transport.zap`), and the
router checks every message's key against the role its command needs
(:meth:`taskbroker.broker.router.Router.handle`), so a key removed from a
folder is refused at its next message, though libzmq keeps its
connection.
"""

import ipaddress

from taskbroker import curve

SECRET_OPTION = "--curve-secret-key"
WORKERS_OPTION = "--authorized-workers"
CLIENTS_OPTION = "--authorized-clients"
ADMINS_OPTION = "--admin-clients"

#: The roles, as logs name them, in the order of the folders.
ROLES = ("workers", "clients", "admins")


def load(config):
    """
    The broker's CURVE material, as its configuration names it.

    :param config: a :class:`taskbroker.config.BrokerConfig`.
    :returns: ``None`` without CURVE, else ``(keypair, peer_keys)``: the
        broker's ``(public, secret)`` keys and its :class:`PeerKeys`
        (``None`` with ``--allow-any-key``).
    :raises ConfigError: with one line, for a key or folder that cannot
        be used.
    """
    if config.curve_secret_key is None:
        return None
    curve.check_support()
    keypair = curve.load_secret(config.curve_secret_key, SECRET_OPTION)
    if config.allow_any_key:
        return keypair, None
    return keypair, PeerKeys(
        config.authorized_workers,
        config.authorized_clients,
        config.admin_clients,
    )


class PeerKeys:
    """
    The keys a broker admits, read from its folders (again at each
    :meth:`reload`).

    :param workers: the folder of worker keys, or ``None``.
    :param clients: the folder of client keys, or ``None``.
    :param admins: the folder of admin client keys, or ``None``.
    :raises ConfigError: if a folder cannot be read.

    Each role is a ``dict``: key (Z85 ``bytes``) -> its file's name.
    """

    def __init__(self, workers, clients, admins=None):
        self._folders = (
            (workers, WORKERS_OPTION),
            (clients, CLIENTS_OPTION),
            (admins, ADMINS_OPTION),
        )
        self.workers = {}
        self.clients = {}
        self.admins = {}
        self.problems = self.reload()

    def reload(self):
        """
        Read the folders again; on a failure, the sets stay as they were.

        :returns: one line for each key file that could not be read (left
            out).
        :raises ConfigError: if a folder cannot be read.
        """
        read, problems = [], []
        for (folder, option), before in zip(self._folders, self.snapshot()):
            if folder is None:
                read.append({})
                continue
            keys, bad = curve.load_folder(folder, option)
            # A file that cannot be read now (caught while being
            # rewritten, say) keeps the key it had: its peer is not
            # refused for it.
            keys.update(
                (key, name) for key, name in before.items() if name in bad
            )
            read.append(keys)
            problems += bad.values()
        self.workers, self.clients, self.admins = read
        return problems

    def changes(self, before):
        """
        What changed since ``before`` (a :meth:`snapshot`), for the log.

        :returns: e.g. ``"workers +w3 -w1; clients +c2"``, or ``""``.
        """
        parts = []
        for role, old, new in zip(ROLES, before, self.snapshot()):
            added = sorted(new[key] for key in new.keys() - old.keys())
            removed = sorted(old[key] for key in old.keys() - new.keys())
            if added or removed:
                parts.append(
                    " ".join(
                        [role]
                        + ["+" + n for n in added]
                        + ["-" + n for n in removed]
                    )
                )
        return "; ".join(parts)

    def snapshot(self):
        """
        Copies of the roles, in the order of :data:`ROLES`.
        """
        return (dict(self.workers), dict(self.clients), dict(self.admins))

    def admits(self, key):
        """
        Whether a peer with this key may connect at all (ZAP).
        """
        return key in self.workers or self.may_ask(key)

    def may_work(self, key):
        return key in self.workers

    def may_ask(self, key):
        return key in self.clients or key in self.admins

    def is_admin(self, key):
        return key in self.admins

    def name(self, key):
        """
        How logs name a key: its file's name, and the key.
        """
        name = (
            self.workers.get(key)
            or self.clients.get(key)
            or self.admins.get(key)
        )
        shown = key.decode("ascii", "replace") if key else "none"
        return f"{name} ({shown})" if name else f"unknown key {shown}"


def reachable_from_afar(endpoint):
    """
    Whether peers on other hosts may reach a bound endpoint: any TCP
    address but a loopback one (``*`` binds every interface, and an
    interface or host name is taken as reachable).
    """
    if not endpoint.startswith("tcp://"):
        return False  # ipc:// and inproc:// stay on the host
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("localhost", "lo"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True
