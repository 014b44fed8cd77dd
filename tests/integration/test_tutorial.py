"""
docs/tutorial.rst, run: every command of its console blocks, in order,
in one shell, from a fresh virtualenv into which the checkout is
installed, with every file its captioned Python blocks show; the output
each command shows is checked against what it prints.

The page's conventions, which this test reads:

- in a ``console`` block, ``$ `` starts a command and the lines after it
  are its output, where ``...`` stands for any text and runs of spaces
  for any white space;
- a command that starts a daemon (``twistd -n ...``) keeps running: its
  output is its log, waited for, and the daemon is stopped (by pid) at
  the end;
- a read-only ``taskbroker`` command whose output does not match yet is
  asked again until it does (the page says "within ten seconds");
- a ``python`` block captioned with a file name is that file.

The defaults the page shows (ports 5555 and 8642) are replaced by free
ports, through the environment, and ``pip install taskbroker`` installs
this checkout.
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
TUTORIAL = os.path.join(ROOT, "docs", "tutorial.rst")
#: Commands asked again until their output matches.
READ_ONLY = (
    "taskbroker list",
    "taskbroker status",
    "taskbroker stats",
    "taskbroker schedule list",
)
#: How long one command (a pip install) or one wait may take.
TIMEOUT = 300.0
WAIT = 60.0


def blocks(text):
    """
    The page's code blocks, in order: ``(language, caption, body)``.
    """
    found = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"\.\. code-block:: (\w+)\s*$", lines[i])
        i += 1
        if not match:
            continue
        caption = None
        while i < len(lines) and lines[i].startswith("   :"):
            option = re.match(r"   :caption: (.*)$", lines[i])
            if option:
                caption = option.group(1).strip()
            i += 1
        body = []
        while i < len(lines) and (
            lines[i].startswith("   ") or not lines[i].strip()
        ):
            body.append(lines[i])
            i += 1
        found.append(
            (
                match.group(1),
                caption,
                textwrap.dedent("\n".join(body)).strip("\n"),
            )
        )
    return found


def commands(body):
    """
    The commands of a console block, each with its expected output.
    """
    steps = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append([line[2:], []])
        else:
            steps[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in steps]


def pattern(expected):
    """
    A regular expression for output the page shows: ``...`` is any text,
    white space any white space, and the lines come in order.
    """
    parts = [
        re.escape(" ".join(part.split())) for part in expected.split("...")
    ]
    return re.compile(r".*?".join(parts).replace(r"\ ", r"\s+"), re.DOTALL)


def normalised(text):
    return " ".join(text.split())


def matches(expected, output):
    return pattern(expected).search(normalised(output)) is not None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Shell:
    """
    One bash, fed one command at a time, so that ``cd`` and ``. activate``
    carry over as they do for a reader.
    """

    def __init__(self, folder, env):
        self.folder = folder
        self.count = 0
        self.daemons = []
        self.process = subprocess.Popen(
            ["bash", "--norc", "--noprofile"],
            stdin=subprocess.PIPE,
            cwd=folder,
            env=env,
            text=True,
        )

    def run(self, command, timeout=TIMEOUT):
        """
        :returns: ``(exit code, output)``.
        """
        self.count += 1
        out = os.path.join(self.folder, f".out.{self.count}")
        done = os.path.join(self.folder, f".rc.{self.count}")
        self.process.stdin.write(
            f"{{ {command}\n}} > {out} 2>&1 < /dev/null; "
            f"echo $? > {done}.tmp; mv {done}.tmp {done}\n"
        )
        self.process.stdin.flush()
        wait_for(lambda: os.path.exists(done), timeout, command)
        with open(out, encoding="utf-8") as f:
            output = f.read()
        with open(done) as f:
            return int(f.read()), output

    def start(self, command):
        """
        Start a daemon in the background; its log is its output.
        """
        self.count += 1
        log = os.path.join(self.folder, f".daemon.{self.count}")
        pid_file = log + ".pid"
        self.process.stdin.write(
            f"{command} > {log} 2>&1 < /dev/null & echo $! > {pid_file}\n"
        )
        self.process.stdin.flush()
        wait_for(
            lambda: (
                os.path.exists(pid_file)
                and open(pid_file).read().endswith("\n")
            ),
            WAIT,
            command,
        )
        with open(pid_file) as f:
            pid = int(f.read())
        self.daemons.append(pid)
        return pid, log

    def close(self):
        for pid in reversed(self.daemons):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 30
        for pid in self.daemons:
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.05)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.stdin.close()
        self.process.wait(timeout=30)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of the shell's is dead too.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)


def test_the_tutorial_runs_as_written(tmp_path):
    with open(TUTORIAL, encoding="utf-8") as f:
        page = f.read()
    broker_port, http_port = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{broker_port}"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "TASKBROKER_LISTEN": endpoint,
        "TASKBROKER_HTTP": f"tcp:{http_port}:interface=127.0.0.1",
        "TASKBROKER_BROKER": endpoint,
        "TASKWORKER_BROKER": endpoint,
        # The registries this machine may use, for pip.
        **{
            k: v
            for k, v in os.environ.items()
            if k.startswith(("PIP_", "UV_"))
            or k in ("http_proxy", "https_proxy")
        },
    }
    ports = {"5555": str(broker_port), "8642": str(http_port)}
    shell = Shell(str(tmp_path), env)
    try:
        for language, caption, body in blocks(page):
            if language == "python" and caption:
                # Written where the reader is: the folder the last cd
                # went to.
                _, where = shell.run("pwd")
                path = os.path.join(where.strip(), caption)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(body + "\n")
                continue
            if language != "console":
                continue
            for command, expected in commands(body):
                for default, port in ports.items():
                    command = command.replace(default, port)
                    expected = expected.replace(default, port)
                run_step(shell, command, expected)
        # The page's folder holds what it said it would.
        where = shell.run("pwd")[1].strip()
        assert os.path.exists(os.path.join(where, "taskbroker.sqlite"))
    finally:
        shell.close()


def run_step(shell, command, expected):
    if (
        command.startswith("pip install")
        and command.split()[-1] == "taskbroker"
    ):
        command = f"{command[: -len('taskbroker')]}{shlex.quote(ROOT)}"
    if command.startswith("twistd -n "):
        _, log = shell.start(command)

        def logged():
            with open(log, encoding="utf-8", errors="replace") as f:
                return matches(expected, f.read())

        try:
            wait_for(logged, WAIT, command)
        except AssertionError:
            with open(log, encoding="utf-8", errors="replace") as f:
                pytest.fail(
                    f"{command}: expected\n{expected}\ngot\n{f.read()[-3000:]}"
                )
        return
    deadline = time.monotonic() + WAIT
    while True:
        code, output = shell.run(command)
        if code == 0 and matches(expected, output):
            return
        if not command.startswith(READ_ONLY) or time.monotonic() > deadline:
            pytest.fail(
                f"{command}: exit {code}; expected\n{expected}\n"
                f"got\n{output[-3000:]}"
            )
        time.sleep(0.5)


def test_the_page_is_read_as_meant():
    # The conventions above, on the page itself: a daemon, a file, and a
    # command with its output.
    with open(TUTORIAL, encoding="utf-8") as f:
        found = blocks(f.read())
    files = [caption for language, caption, _ in found if language == "python"]
    assert files == ["handlers/greetings.py", "submit.py"]
    steps = [
        step
        for language, _, body in found
        if language == "console"
        for step in commands(body)
    ]
    assert "twistd -n --pidfile= taskbroker" in [
        command for command, _ in steps
    ]
    assert (
        'taskbroker submit greet --payload \'{"name": "Ada"}\' --wait',
        '"Hello, Ada!"',
    ) in steps
    assert matches('"Hello, Ada!"', '"Hello, Ada!"\n')
    assert not matches('"Hello, Ada!"', '"Hello, Bob!"\n')
    assert matches("workers: 2, slots: 2, ...", "workers: 2, slots: 2, free")
