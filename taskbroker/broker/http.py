# -*- test-case-name: tests.integration.test_http -*-
"""
The broker's HTTP status site (``--http``): a JSON API to read the queues,
the workers and the tasks, to submit, cancel and retry tasks, and to keep
the schedules of periodic tasks.

Every request's ``Host`` and ``Origin`` are checked first: on a loopback
address the site answers only to a loopback host name (a page on another
site that a browser was made to resolve to 127.0.0.1 gets nothing), and a
request from a page of another origin gets nothing either.  Reading needs
the site's token (``Authorization: Bearer TOKEN`` or ``?token=``) when
the site listens beyond loopback or the broker uses CURVE; acting always
needs it, in the ``Authorization`` header.
"""

import hmac
import ipaddress
import json
import secrets
from importlib.resources import files
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.web import resource, server

from taskbroker.broker.requests import SITE, Refused
from taskbroker.errors import ConfigError, StoreError, WriteRefused, one_line
from taskbroker.logs import cut
from taskbroker.protocol import codec
from taskbroker.protocol.objects import iso_time
from taskbroker.schedules import check_name as check_schedule_name
from taskbroker.store import STATES

#: The dashboard's files, served from the package: name -> content type.
DASHBOARD = {
    "index.html": b"text/html; charset=utf-8",
    "dashboard.js": b"text/javascript; charset=utf-8",
    "dashboard.css": b"text/css; charset=utf-8",
    "favicon.svg": b"image/svg+xml",
}

#: How many recent failures the dashboard shows.
RECENT_FAILURES = 10

#: The HTTP status of each ERROR code the broker answers requests with.
STATUS_OF_CODE = {
    "not_found": 404,
    "bad_request": 400,
    "unknown_priority": 400,
    "bad_schedule": 400,
    "exists": 409,
    "too_large": 413,
    "not_cancellable": 409,
    "not_retryable": 409,
    "refused": 422,
    "forbidden": 403,
    "busy": 503,
    "unavailable": 503,
}

#: The most tasks one page of /api/tasks holds.
MOST_PER_PAGE = 500

#: Host names a site on a loopback address answers to.
LOOPBACK_NAMES = frozenset(("localhost", "127.0.0.1", "::1"))


class HTTPError(Exception):
    """
    A request answered with an error: its status code and one line.
    """

    def __init__(self, status, message):
        Exception.__init__(self, message)
        self.status = status
        self.message = message


def load_token(path):
    """
    The site's token: the first line of ``path``, or, without one, a new
    random one.

    :raises ConfigError: if the file cannot be read or holds too short a
        token.
    """
    if path is None:
        return secrets.token_urlsafe(24)
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"--http-token-file: cannot read {path}: {one_line(e)}"
        ) from None
    if len(token) < 16:
        raise ConfigError(
            f"--http-token-file: {path} must hold a token of "
            "at least 16 characters on its first line"
        )
    return token


def is_loopback(host):
    """
    Whether an interface address (as an endpoint's ``interface=`` gives
    it) is a loopback one.
    """
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class StatusSite(resource.Resource):
    """
    The site's root: checks each request, then routes ``/api/...``.

    :param broker: the :class:`taskbroker.broker.core.Broker`.
    :param token: the site's token.
    :param loopback: whether the site listens on loopback only.
    :param open_reads: whether reading needs no token.
    """

    isLeaf = True

    def __init__(self, broker, token, loopback, open_reads):
        resource.Resource.__init__(self)
        self._broker = broker
        self._token = token
        self.loopback = loopback
        self.open_reads = open_reads

    def render(self, request):
        gone = []
        request.notifyFinish().addErrback(gone.append)
        d = defer.maybeDeferred(self._answer, request)
        d.addCallback(self._send, request, 200, gone)
        d.addErrback(self._failed, request, gone)
        return server.NOT_DONE_YET

    def _answer(self, request):
        self._check_origin(request)
        path = request.path.decode("utf-8", "replace").rstrip("/")
        parts = path.split("/")[1:]
        if request.method == b"POST":
            # Acting always needs the token, and only in its header: a
            # link or a form cannot carry one.
            self._check_token(request, in_query=False)
            return self._act(request, parts, path)
        if request.method != b"GET":
            raise HTTPError(405, "only GET and POST are served")
        if parts in ([], [""]) or (len(parts) == 1 and parts[0] in DASHBOARD):
            # The page holds no data: what it shows, it reads from the API.
            return _File(parts[0] if parts and parts[0] else "index.html")
        if not self.open_reads:
            self._check_token(request)
        if parts == ["api", "overview"]:
            return self._overview()
        if parts == ["metrics"]:
            return _Text(self._broker.metrics.render())
        if parts == ["api", "stats"]:
            status = self._broker.status
            return status.counted().addCallback(
                lambda _: {"stats": status.stats()}
            )
        if parts == ["api", "workers"]:
            return {"workers": self._broker.status.workers()}
        if parts == ["api", "tasks"]:
            return self._tasks(request)
        if parts == ["api", "schedules"]:
            return self._broker.schedules.list({}, SITE)
        if len(parts) == 3 and parts[:2] == ["api", "tasks"]:
            return self._task(parts[2])
        raise HTTPError(404, f"no such page: {path or '/'}")

    def _check_origin(self, request):
        host = request.getHeader("host") or ""
        origin = request.getHeader("origin")
        try:
            name = urlsplit("//" + host).hostname or ""
            elsewhere = origin is not None and urlsplit(origin).netloc != host
        except ValueError:  # e.g. "[::1": not a host at all
            raise HTTPError(
                400, "the Host or Origin header is not a host"
            ) from None
        if self.loopback and name not in LOOPBACK_NAMES:
            raise HTTPError(403, "this site answers to localhost only")
        if elsewhere:
            raise HTTPError(403, "requests from other sites are refused")

    def _overview(self):
        """
        What the dashboard shows, in one answer: the stats, the workers
        with what each runs and how far it has got (from memory), and
        the latest failures.
        """
        broker = self._broker
        status = broker.status
        running = status.running()
        d = status.counted().addCallback(
            lambda _: broker.store.list(
                "failed",
                None,
                0,
                RECENT_FAILURES,
                codec.MAX_LIST_BYTES,
                newest_first=True,
            )
        )

        def answer(failed):
            # What the dashboard shows of each worker, and no more: a
            # refresh stays small with a thousand of them.
            workers = [
                {
                    "name": worker["name"],
                    "priorities": worker["priorities"],
                    "slots": worker["slots"],
                    "busy": worker["busy"],
                    "running": running.get(worker["name"], []),
                }
                for worker in status.workers()
            ]
            return {
                "stats": status.stats(),
                "workers": workers,
                "failures": [
                    {
                        "id": row.id,
                        "handler": row.handler,
                        "priority": row.priority,
                        "error": cut(row.error, 300),
                        "finished_at": iso_time(row.finished_at),
                    }
                    for row in failed
                ],
            }

        return d.addCallback(answer)

    def _act(self, request, parts, path):
        requests = self._broker.requests
        schedules = self._broker.schedules
        if parts == ["api", "tasks"]:
            body = self._body(request, b"SUBMIT")
            answered = []
            d = requests.submit(body, SITE, answered.append)
            return d.addCallback(lambda _: answered[0])
        if (
            len(parts) == 4
            and parts[:2] == ["api", "tasks"]
            and parts[3] in ("cancel", "retry")
        ):
            task_id = _task_id(parts[2])
            act = requests.cancel if parts[3] == "cancel" else requests.retry
            return act(task_id, SITE)
        if parts == ["api", "schedules"]:
            return schedules.add(self._body(request, b"SCHEDULE_ADD"), SITE)
        if (
            len(parts) == 4
            and parts[:2] == ["api", "schedules"]
            and parts[3] in ("pause", "resume", "remove")
        ):
            try:
                body = {"name": check_schedule_name(parts[2])}
            except ValueError as e:
                raise HTTPError(400, one_line(e)) from None
            return getattr(schedules, parts[3])(body, SITE)
        raise HTTPError(404, f"no such action: {path}")

    @staticmethod
    def _body(request, command):
        """
        The body of a POST, checked as the protocol's ``command`` is.
        """
        data = request.content.read(codec.MAX_MESSAGE_SIZE + 1)
        if len(data) > codec.MAX_MESSAGE_SIZE:
            raise HTTPError(
                413,
                "the request exceeds the limit of "
                f"{codec.MAX_MESSAGE_SIZE} bytes",
            )
        try:
            body = codec.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise HTTPError(
                400, f"the body is not JSON: {one_line(e)}"
            ) from None
        if not isinstance(body, dict):
            raise HTTPError(
                400, "the body must be a JSON object (see docs/http.rst)"
            )
        try:
            _, checked = codec.decode(
                codec.encode(command, dict(body, req="http")),
                codec.CLIENT_COMMANDS,
            )
        except codec.ProtocolError as e:
            raise HTTPError(
                STATUS_OF_CODE.get(e.code, 400), e.message
            ) from None
        return checked

    def _check_token(self, request, in_query=True):
        given = None
        header = request.getHeader("authorization") or ""
        if header.startswith("Bearer "):
            given = header[len("Bearer ") :].strip()
        elif in_query:
            given = _arg(request, "token")
        if given is None or not hmac.compare_digest(
            given.encode("utf-8"), self._token.encode("utf-8")
        ):
            raise HTTPError(
                401,
                "a token is needed (Authorization: Bearer "
                "TOKEN, or ?token=TOKEN; the broker's log "
                "shows the site's URL with it)",
            )

    def _tasks(self, request):
        state = _arg(request, "state")
        if state is not None and state not in STATES:
            raise HTTPError(400, "state must be one of " + ", ".join(STATES))
        filters = {}
        for name in ("priority", "handler"):
            value = _arg(request, name)
            if value is not None:
                try:
                    filters[name] = codec.check_name(value)
                except ValueError as e:
                    raise HTTPError(400, f"{name} {e}") from None
        # A LIST, newest first, paged by 'before'.
        d = self._broker.requests.list_tasks(
            {
                "state": state,
                "handler": filters.get("handler"),
                "priority": filters.get("priority"),
                "order": "newest",
                "before": _number(request, "cursor", None, 1, codec.MAX_EXACT),
                "limit": _number(request, "limit", 100, 1, MOST_PER_PAGE),
            },
            SITE,
        )
        return d.addCallback(
            lambda answer: {"tasks": answer["tasks"], "next": answer["next"]}
        )

    def _task(self, text):
        return self._broker.requests.get(_task_id(text), SITE)

    def _send(self, body, request, status, gone):
        if gone or request.finished:
            return  # the client went away
        if isinstance(body, _Text):
            data, kind = body.data, CONTENT_TYPE_LATEST.encode("ascii")
        elif isinstance(body, _File):
            data, kind = body.data, DASHBOARD[body.name]
            request.setHeader(
                b"content-security-policy",
                b"default-src 'self'; frame-ancestors 'none'",
            )
            request.setHeader(b"x-frame-options", b"DENY")
        else:
            data = json.dumps(body, separators=(",", ":")).encode("utf-8")
            kind = b"application/json"
        request.setResponseCode(status)
        request.setHeader(b"content-type", kind)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.write(data)
        request.finish()

    def _failed(self, reason, request, gone):
        if reason.check(HTTPError):
            error = reason.value
            self._send({"error": error.message}, request, error.status, gone)
            return
        if reason.check(Refused):
            refused = reason.value
            self._send(
                {"error": refused.message, "code": refused.code},
                request,
                STATUS_OF_CODE.get(refused.code, 400),
                gone,
            )
            return
        self._broker.trouble(reason, "answering an HTTP request")
        if reason.check(WriteRefused):
            self._send(
                {
                    "error": "the database refused it: "
                    f"{one_line(reason.value)}",
                    "code": "refused",
                },
                request,
                422,
                gone,
            )
            return
        if reason.check(StoreError):
            self._send(
                {
                    "error": "the database cannot be used right now; "
                    "try again",
                    "code": "unavailable",
                },
                request,
                503,
                gone,
            )
            return
        self._send(
            {"error": "internal error; see the broker's log"},
            request,
            500,
            gone,
        )


class _File:
    """
    A file of the dashboard, read from the package.
    """

    def __init__(self, name):
        self.name = name
        self.data = (
            files("taskbroker.broker") / "dashboard" / name
        ).read_bytes()


class _Text:
    """
    An answer in Prometheus's text format rather than JSON.
    """

    def __init__(self, data):
        self.data = data


def _task_id(text):
    try:
        return codec.check_task_id(int(text))
    except ValueError:
        raise HTTPError(400, f"{text!r} is not a task id") from None


def _arg(request, name):
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, f"{name} is not UTF-8 text") from None


def _number(request, name, default, low, high):
    text = _arg(request, name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise HTTPError(
            400, f"{name} must be a whole number from {low} to {high}"
        )
    return value
