"""
The dashboard in a real browser: headless Chromium (Debian's chromium
and chromium-driver, driven with selenium) loads the status site of a
running broker with a live worker, and what the page shows must match
the API and follow the tasks as a handler reports progress and as they
end.  A screenshot is saved as test-artifacts/dashboard.png (or under
$TASKBROKER_TEST_ARTIFACTS).
"""

import json
import os
import shutil
import urllib.request

import pytest

from tests.integration.test_http import site

#: Seconds the page may take to show a change (it refreshes every two).
SHOWN_WITHIN = 20

ARTIFACTS = os.environ.get("TASKBROKER_TEST_ARTIFACTS") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    "test-artifacts",
)


@pytest.fixture
def browser():
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        reason = (
            "the dashboard test needs Debian's chromium and "
            "chromium-driver (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; under CI it must run", pytrace=False)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def overview(base, token):
    request = urllib.request.Request(
        base + "api/overview", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def until(browser, check, what):
    """
    Wait until ``check(browser)`` is true (the page refreshes itself).
    """
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, SHOWN_WITHIN, poll_frequency=0.2).until(
        lambda b: check(b), message=what
    )


def text_of(browser, selector):
    """
    The text of the first element ``selector`` finds, its white space
    collapsed, or ``None``.
    """
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, selector)
    return " ".join(found[0].text.split()) if found else None


def test_the_dashboard_follows_the_tasks(cluster, browser, tmp_path):
    from selenium.webdriver.common.by import By

    broker = cluster.start_broker()
    cluster.start_worker("--concurrency", "2", name="w1")
    base, token = site(broker)
    release = tmp_path / "release"
    failing = cluster.cli("submit", "fail", "--max-attempts", "1").stdout
    failing = int(failing)
    assert cluster.cli("wait", str(failing)).returncode == 1
    running = int(
        cluster.cli(
            "submit",
            "progress",
            "--payload",
            json.dumps(
                {"steps": [[0.4, "page 4 of 10"]], "until": str(release)}
            ),
        ).stdout
    )

    browser.get(f"{base}?token={token}")
    running_line = f'tr[data-worker="w1"] .running-task[data-task="{running}"]'
    until(
        browser,
        lambda b: (text_of(b, running_line) or "").endswith(
            "40% page 4 of 10"
        ),
        "the running task's progress",
    )
    # What the page shows is what the API says.
    api = overview(base, token)
    [w1] = api["workers"]
    assert [(t["id"], t["progress"], t["message"]) for t in w1["running"]] == [
        (running, 0.4, "page 4 of 10")
    ]
    assert text_of(browser, 'tr[data-worker="w1"] td:nth-child(2)') == (
        f"{w1['busy']}/{w1['slots']}"
    )
    normal = browser.find_element(
        By.CSS_SELECTOR, '#queues tr[data-level="normal"]'
    )
    cells = [td.text for td in normal.find_elements(By.TAG_NAME, "td")]
    tasks = api["stats"]["tasks"]
    assert cells == ["normal"] + [
        str(tasks.get(state, {}).get("normal", 0))
        for state in ("queued", "running", "succeeded", "failed", "cancelled")
    ]
    failure = f'#failures tr[data-task="{failing}"]'
    assert "RuntimeError: failed on purpose" in text_of(browser, failure)
    # The token left the address bar once read.
    assert "token" not in browser.current_url
    os.makedirs(ARTIFACTS, exist_ok=True)
    browser.save_screenshot(os.path.join(ARTIFACTS, "dashboard.png"))

    # The task ends: it leaves the worker's line, and is counted.
    release.touch()
    until(
        browser,
        lambda b: text_of(b, running_line) is None,
        "the finished task gone from its worker",
    )
    until(
        browser,
        lambda b: (
            [
                td.text
                for td in b.find_element(
                    By.CSS_SELECTOR, '#queues tr[data-level="normal"]'
                ).find_elements(By.TAG_NAME, "td")
            ][3]
            == "1"
        ),
        "the success counted",
    )

    # Find a task, and retry the failed one from the page.
    browser.find_element(By.ID, "search-id").send_keys(str(running))
    browser.find_element(By.CSS_SELECTOR, "#search button").click()
    until(
        browser,
        lambda b: "succeeded" in (text_of(b, "#task") or ""),
        "the task found",
    )
    browser.find_element(
        By.CSS_SELECTOR, failure + " button.action-retry"
    ).click()
    until(
        browser,
        lambda b: text_of(b, "#message") == (f"task {failing}: queued"),
        "the retry done",
    )
    status = json.loads(cluster.cli("status", str(failing), "--json").stdout)
    assert status["attempts"] <= 1 and status["state"] in (
        "queued",
        "running",
        "failed",
    )
