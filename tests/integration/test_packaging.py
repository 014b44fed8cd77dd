"""
The wheel ships our plugin drop-in beside Twisted's and nothing else in
Twisted's tree, plus the schema files and the license.
"""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_wheel_contents(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            ROOT,
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = list(tmp_path.glob("taskbroker-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    twisted_files = [n for n in names if n.startswith("twisted/")]
    assert twisted_files == ["twisted/plugins/taskbroker_plugin.py"]
    assert "taskbroker/store/schema/sqlite/v1.sql" in names
    for name in ("index.html", "dashboard.js", "dashboard.css", "favicon.svg"):
        assert f"taskbroker/broker/dashboard/{name}" in names
    assert "taskbroker/plugins/taskbroker_builtin_handlers.py" in names
    assert not any(n.startswith("tests/") for n in names)
    version = wheel.name.split("-")[1]
    dist_info = f"taskbroker-{version}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata.splitlines()


def test_twistd_lists_both_daemons():
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    out = subprocess.run(
        [twistd, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "taskbroker" in out and "taskworker" in out


@pytest.mark.parametrize("daemon", ["taskbroker", "taskworker"])
def test_version_is_taskbrokers_and_acts_before_anything_starts(
    daemon, tmp_path
):
    import taskbroker

    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    # Settings that would stop a start do not stop --version.
    env = dict(
        os.environ, TASKBROKER_DATABASE="nonsense", TASKWORKER_CONCURRENCY="-1"
    )
    done = subprocess.run(
        [twistd, "--pidfile=", "-n", daemon, "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (
        0,
        f"taskbroker {taskbroker.__version__}\n",
    ), done.stderr
    assert list(tmp_path.iterdir()) == []  # no log, no database


def test_list_handlers_says_what_a_worker_would_load(tmp_path):
    folder = tmp_path / "handlers"
    folder.mkdir()
    (folder / "good_sum.py").write_text(
        "from taskbroker import handler\n\n"
        "@handler('good.sum', blocking=True, time_limit=30)\n"
        "def add(task):\n    return sum(task.payload)\n"
    )
    (folder / "broken_mod.py").write_text("def oops(:\n")
    (folder / "class_only.py").write_text(
        "from twisted.plugin import IPlugin\n"
        "from zope.interface import implementer\n"
        "from taskbroker.interfaces import ITaskHandler\n\n"
        "@implementer(IPlugin, ITaskHandler)\n"
        "class Lonely:\n    name = 'lonely'\n    blocking = False\n\n"
        "    def run(self, task):\n        return None\n"
    )
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    # An action: settings that would stop a start do not stop it.
    env = dict(
        os.environ,
        TASKWORKER_CONCURRENCY="-1",
        TASKWORKER_HANDLERS_PATH=str(folder),
    )
    done = subprocess.run(
        [twistd, "--pidfile=", "-n", "taskworker", "--list-handlers"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["HANDLER", "KIND", "TIME", "LIMIT", "FROM"]
    [good] = [line for line in lines if line.startswith("good.sum")]
    assert good.split() == [
        "good.sum",
        "blocking",
        "30",
        "s",
        str(folder / "good_sum.py"),
    ]
    assert any(
        line.startswith("echo ") and line.endswith("(built in)")
        for line in lines
    )
    assert any(
        line.startswith(
            "error: could not load handler module "
            f"{folder / 'broken_mod.py'}: SyntaxError"
        )
        for line in lines
    ), lines
    assert any(
        line.startswith("warn: handler module ")
        and "class_only.py defines the handler class Lonely" in line
        for line in lines
    ), lines
    assert not any(line.startswith("lonely") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["handlers"]
