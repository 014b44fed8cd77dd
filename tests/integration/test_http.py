"""
The broker's HTTP status site, against a real broker over HTTP: its JSON
API, and what it refuses (other host names, other origins, no token).
"""

import json
import os
import re
import urllib.error
import urllib.request

import pytest

from taskbroker import curve


def site(broker):
    """
    The site's base URL and token, from the line the broker logs.
    """
    match = broker.wait_for(r"status site at (http://\S+/)\?token=(\S+)")
    return match.group(1), match.group(2)


def answer(request):
    """
    :returns: ``(status, JSON body)`` of a ``urllib`` request.
    """
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url, headers=None):
    return answer(urllib.request.Request(url, headers=headers or {}))


def test_the_api_shows_the_queues_the_workers_and_the_tasks(cluster):
    broker = cluster.start_broker()
    cluster.start_worker(name="w1")
    base, _ = site(broker)
    for handler, priority in (
        ("echo", "high"),
        ("nobody", "low"),
        ("nobody", "high"),
    ):
        run = cluster.cli("submit", handler, "--priority", priority)
        assert run.returncode == 0, run.stderr
    done = cluster.cli("wait", "1")
    assert done.returncode == 0

    status, body = get(base + "api/stats")
    assert status == 200
    cli_stats = json.loads(cluster.cli("stats", "--json").stdout)
    assert body["stats"]["tasks"] == cli_stats["tasks"]
    assert body["stats"]["workers"] == 1

    status, body = get(base + "api/workers")
    assert [w["name"] for w in body["workers"]] == ["w1"]

    # Newest first, as `taskbroker list --json` shows them.
    status, body = get(base + "api/tasks")
    listed = json.loads(cluster.cli("list", "--json").stdout)
    assert body == {"tasks": listed, "next": None}
    assert [t["id"] for t in body["tasks"]] == [3, 2, 1]
    status, body = get(base + "api/tasks?priority=high&limit=1")
    assert ([t["id"] for t in body["tasks"]], body["next"]) == ([3], 3)
    status, body = get(base + "api/tasks?priority=high&cursor=3")
    assert [t["id"] for t in body["tasks"]] == [1]
    status, body = get(base + "api/tasks?state=succeeded")
    assert [t["id"] for t in body["tasks"]] == [1]
    status, body = get(base + "api/tasks/1")
    assert status == 200 and body["task"] == json.loads(
        cluster.cli("status", "1", "--json").stdout
    )


@pytest.mark.parametrize(
    "path, status, says",
    [
        ("api/tasks/99", 404, "no task with id 99"),
        ("api/tasks/x", 400, "is not a task id"),
        ("api/tasks?state=sleeping", 400, "state must be one of"),
        ("api/tasks?limit=0", 400, "limit must be a whole number"),
        ("api/nothing", 404, "no such page"),
    ],
)
def test_bad_requests_get_a_json_error(cluster, path, status, says):
    base, _ = site(cluster.start_broker())
    got, body = get(base + path)
    assert got == status and says in body["error"]


def test_other_hosts_and_origins_are_refused(cluster):
    broker = cluster.start_broker()
    base, token = site(broker)
    port = re.search(r":(\d+)/$", base).group(1)
    # A name an attacker's DNS pointed at 127.0.0.1 (DNS rebinding).
    status, body = get(base + "api/stats", {"Host": f"evil.example:{port}"})
    assert status == 403 and "localhost only" in body["error"]
    # A page of another site, through the user's browser.
    status, body = get(base + "api/stats", {"Origin": "http://evil.example"})
    assert status == 403 and "other sites" in body["error"]
    status, body = get(base + "api/stats", {"Host": "[::1"})
    assert status == 400 and "not a host" in body["error"]
    # Its own origin is fine.
    status, _ = get(base + "api/stats", {"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200


def test_with_curve_reading_needs_the_token(cluster, tmp_path):
    keys = tmp_path / "keys"
    curve.keygen(str(keys), "broker")
    token_file = tmp_path / "token"
    token_file.write_text("a-token-of-the-operators-own\n")
    broker = cluster.start_broker(
        "--curve-secret-key",
        str(keys / "broker.key_secret"),
        "--allow-any-key",
        "--http-token-file",
        str(token_file),
    )
    match = broker.wait_for(
        r"status site at (http://\S+/) \(its token is "
        "in "
    )
    base = match.group(1)
    assert "a-token-of-the-operators-own" not in broker.output()
    status, body = get(base + "api/stats")
    assert status == 401 and "a token is needed" in body["error"]
    status, _ = get(
        base + "api/stats", {"Authorization": "Bearer wrong-token-wrong-token"}
    )
    assert status == 401
    status, _ = get(
        base + "api/stats",
        {"Authorization": "Bearer a-token-of-the-operators-own"},
    )
    assert status == 200
    status, _ = get(base + "api/stats?token=a-token-of-the-operators-own")
    assert status == 200


def test_an_http_endpoint_that_is_taken_stops_the_broker(cluster):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # (The default one only warns, for a second broker on a host:
        # tests/unit/test_broker_service.py.)
        broker = cluster.start_broker(
            "--http", f"tcp:{port}:interface=127.0.0.1", wait=False
        )
        assert broker.wait_exit() != 0
        assert "cannot serve --http tcp:" in broker.output()


def post(url, body=None, token=None, headers=None):
    """
    :returns: ``(status, JSON body)``.
    """
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(
        url, data=data or b"", method="POST", headers=dict(headers or {})
    )
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    return answer(request)


def test_the_api_submits_cancels_and_retries_with_the_token(cluster):
    broker = cluster.start_broker()
    base, token = site(broker)
    # Nothing is done without the token, in its header.
    status, body = post(base + "api/tasks", {"tasks": [{"handler": "echo"}]})
    assert status == 401
    status, _ = post(
        base + f"api/tasks?token={token}", {"tasks": [{"handler": "echo"}]}
    )
    assert status == 401
    assert json.loads(cluster.cli("list", "--json").stdout) == []

    status, body = post(
        base + "api/tasks",
        {
            "tasks": [
                {"handler": "echo", "payload": {"n": 1}, "priority": "high"},
                {"handler": "ecoh"},
            ]
        },
        token,
    )
    assert status == 200, body
    assert [t["id"] for t in body["tasks"]] == [1, 2]
    assert body["unserved"] == ["echo", "ecoh"]
    assert json.loads(cluster.cli("status", "1", "--json").stdout)[
        "payload"
    ] == {"n": 1}

    status, body = post(base + "api/tasks/2/cancel", token=token)
    assert (status, body["task"]["state"]) == (200, "cancelled")
    status, body = post(base + "api/tasks/1/retry", token=token)
    assert (status, body["task"]["state"]) == (200, "queued")  # as it was
    status, body = post(base + "api/tasks/2/retry", token=token)
    assert (status, body["task"]["state"]) == (200, "queued")
    cluster.start_worker(name="w1")
    assert cluster.cli("wait", "1").returncode == 0
    # No worker has 'ecoh': it waits, queued.
    assert (
        json.loads(cluster.cli("status", "2", "--json").stdout)["state"]
        == "queued"
    )

    # The protocol's refusals, with their codes.
    status, body = post(base + "api/tasks/99/cancel", token=token)
    assert (status, body["code"]) == (404, "not_found")
    status, body = post(base + "api/tasks/1/cancel", token=token)
    assert (status, body["code"]) == (409, "not_cancellable")
    status, body = post(
        base + "api/tasks",
        {"tasks": [{"handler": "echo", "priority": "urgent"}]},
        token,
    )
    assert (status, body["code"]) == (400, "unknown_priority")
    status, body = post(base + "api/tasks", {"tasks": []}, token)
    assert status == 400 and "tasks" in body["error"]
    status, body = post(base + "api/tasks", ["not", "an", "object"], token)
    assert status == 400


def test_a_page_of_another_site_cannot_act(cluster):
    base, token = site(cluster.start_broker())
    status, _ = post(
        base + "api/tasks",
        {"tasks": [{"handler": "echo"}]},
        token,
        {"Origin": "http://evil.example"},
    )
    assert status == 403
    assert json.loads(cluster.cli("list", "--json").stdout) == []


def scrape(url, headers=None):
    """
    :returns: ``{(name, labels as a sorted tuple): value}`` of a scrape,
        read with the Prometheus client's own parser.
    """
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_metrics_agree_with_stats(cluster):
    broker = cluster.start_broker()
    cluster.start_worker(name="w1")
    base, _ = site(broker)
    for handler, priority in (
        ("echo", "high"),
        ("echo", "normal"),
        ("fail", "normal"),
        ("nobody", "low"),
    ):
        run = cluster.cli(
            "submit", handler, "--priority", priority, "--max-attempts", "1"
        )
        assert run.returncode == 0, run.stderr
    cluster.cli("wait", "1", "2", "3")
    cancel = cluster.cli("cancel", "4")
    assert cancel.returncode == 0

    metrics = scrape(base + "metrics")
    stats = json.loads(cluster.cli("stats", "--json").stdout)
    assert metrics[("taskbroker_workers", ())] == stats["workers"] == 1
    assert metrics[("taskbroker_worker_slots", (("state", "free"),))] == 1
    assert metrics[("taskbroker_worker_slots", (("state", "busy"),))] == 0

    def finished(priority, handler, outcome):
        return metrics.get(
            (
                "taskbroker_tasks_finished_total",
                (
                    ("handler", handler),
                    ("outcome", outcome),
                    ("priority", priority),
                ),
            ),
            0,
        )

    assert finished("high", "echo", "succeeded") == 1
    assert finished("normal", "echo", "succeeded") == 1
    assert finished("normal", "fail", "failed") == 1
    # Not served by any worker: counted, under _other.
    assert finished("low", "_other", "cancelled") == 1
    assert sum(
        value
        for (name, _), value in metrics.items()
        if name == "taskbroker_tasks_finished_total"
    ) == sum(
        n
        for state in ("succeeded", "failed", "cancelled")
        for n in stats["tasks"].get(state, {}).values()
    )
    echo_high = (("handler", "echo"), ("priority", "high"))
    assert metrics[("taskbroker_task_wait_seconds_count", echo_high)] == 1
    assert metrics[("taskbroker_task_run_seconds_count", echo_high)] == 1
    assert (
        metrics[
            (
                "taskbroker_task_run_seconds_bucket",
                tuple(sorted(echo_high + (("le", "+Inf"),))),
            )
        ]
        == 1
    )
    assert metrics[("taskbroker_bad_messages_total", ())] == 0
    # Nothing waits or runs now.
    assert not any(
        value
        for (name, _), value in metrics.items()
        if name in ("taskbroker_queue_depth", "taskbroker_tasks_running")
    )


def test_the_queue_depth_is_the_tables(cluster):
    broker = cluster.start_broker()
    base, _ = site(broker)
    for priority in ("high", "high", "low"):
        cluster.cli("submit", "echo", "--priority", priority)
    metrics = scrape(base + "metrics")
    # No worker serves echo: its queue is counted under _other.
    assert (
        metrics[
            (
                "taskbroker_queue_depth",
                (("handler", "_other"), ("priority", "high")),
            )
        ]
        == 2
    )
    assert (
        metrics[
            (
                "taskbroker_queue_depth",
                (("handler", "_other"), ("priority", "low")),
            )
        ]
        == 1
    )


def test_the_dashboard_is_served_from_the_package(cluster, tmp_path):
    # The page holds no data, so it needs no token, even with CURVE on;
    # what it shows it reads from the API, which does.
    keys = tmp_path / "keys"
    curve.keygen(str(keys), "broker")
    broker = cluster.start_broker(
        "--curve-secret-key",
        str(keys / "broker.key_secret"),
        "--allow-any-key",
    )
    base, token = site(broker)
    for path, kind in (
        ("", "text/html"),
        ("dashboard.js", "text/javascript"),
        ("dashboard.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ):
        with urllib.request.urlopen(base + path, timeout=30) as response:
            assert response.headers["Content-Type"].startswith(kind)
            # Nothing from elsewhere: no page, script or font of another
            # site may load, and no other site may frame it.
            assert response.headers["Content-Security-Policy"] == (
                "default-src 'self'; frame-ancestors 'none'"
            )
            body = response.read().decode("utf-8")
        # (An SVG names its namespace by a URL that nothing loads.)
        body = body.replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in body and "https://" not in body
    status, body = get(base + "api/overview")
    assert status == 401
    status, body = get(
        base + "api/overview", {"Authorization": f"Bearer {token}"}
    )
    assert status == 200 and set(body) == {"stats", "workers", "failures"}


# The OpenAPI description (docs/openapi.json) against what the site does.

SPEC = os.path.join(
    os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ),
    "docs",
    "openapi.json",
)


def conforms(value, schema, spec, where="answer"):
    """
    Check ``value`` against the parts of an OpenAPI schema this API
    uses: references, object's required properties, arrays' items,
    types and nullable.
    """
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = spec["components"]["schemas"][name]
    if value is None:
        assert schema.get("nullable") or not schema.get("type"), where
        return
    kind = schema.get("type")
    python = {
        "object": dict,
        "array": list,
        "string": str,
        "integer": int,
        "number": (int, float),
        "boolean": bool,
    }
    if kind is not None:
        assert isinstance(value, python[kind]), (where, value, kind)
    for name in schema.get("required", ()):
        assert name in value, (where, name)
    for name, sub in schema.get("properties", {}).items():
        if name in value:
            conforms(value[name], sub, spec, f"{where}.{name}")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            conforms(item, schema["items"], spec, f"{where}[{i}]")


def test_the_api_is_as_its_openapi_description_says(cluster):
    with open(SPEC, encoding="utf-8") as f:
        spec = json.load(f)
    broker = cluster.start_broker()
    cluster.start_worker(name="w1")
    base, token = site(broker)
    # Task 1 fails; task 2 waits for a handler nobody serves.
    status, _ = post(
        base + "api/tasks",
        {
            "tasks": [
                {"handler": "fail", "max_attempts": 1},
                {"handler": "nobody"},
            ]
        },
        token,
    )
    assert status == 200
    assert cluster.cli("wait", "1").returncode == 1
    checked = set()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            task_id = "2" if path.endswith("/cancel") else "1"
            url = base + path.lstrip("/").replace("{id}", task_id).replace(
                "{name}", "nightly"
            )
            if method == "get" and path == "/metrics":
                with urllib.request.urlopen(url, timeout=30) as response:
                    assert response.status == 200
            elif method == "get":
                status, body = get(url)
                assert status == 200, (path, body)
                schema = operation["responses"]["200"]["content"][
                    "application/json"
                ]["schema"]
                conforms(body, schema, spec, path)
            else:
                sent = {
                    "/api/tasks": {
                        "tasks": [{"handler": "echo", "payload": 1}]
                    },
                    "/api/schedules": {
                        "name": "nightly",
                        "handler": "echo",
                        "cron": "0 3 * * *",
                        "timezone": "Europe/Paris",
                    },
                }.get(path)
                status, body = post(url, sent, token)
                schema = operation["responses"]["200"]["content"][
                    "application/json"
                ]["schema"]
                assert status == 200, (path, body)
                conforms(body, schema, spec, path)
            checked.add((method, path))
    # Every route the site serves is described (and was just called).
    assert checked == {
        ("get", "/api/stats"),
        ("get", "/api/workers"),
        ("get", "/api/tasks"),
        ("post", "/api/tasks"),
        ("get", "/api/tasks/{id}"),
        ("post", "/api/tasks/{id}/cancel"),
        ("post", "/api/tasks/{id}/retry"),
        ("get", "/api/overview"),
        ("get", "/metrics"),
        ("post", "/api/schedules"),
        ("get", "/api/schedules"),
        ("post", "/api/schedules/{name}/pause"),
        ("post", "/api/schedules/{name}/resume"),
        ("post", "/api/schedules/{name}/remove"),
    }
    # An error, as described.
    status, body = get(base + "api/tasks/999")
    conforms(body, spec["components"]["schemas"]["Error"], spec)
