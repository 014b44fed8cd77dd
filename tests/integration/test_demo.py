"""
``make demo`` end to end: it runs, every task succeeds, and it leaves no
daemon behind.
"""

import os
import re
import subprocess
import sys


def test_demo_runs_and_cleans_up(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TASKBROKER_", "TASKWORKER_"))
    }
    done = subprocess.run(
        [sys.executable, "-m", "taskbroker.demo", "--scale", "0.1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    pids_file = tmp_path / "demo-run" / "pids.txt"
    pids = {}
    if pids_file.exists():
        for line in pids_file.read_text().splitlines():
            name, pid = line.split()
            pids[name] = int(pid)
    # Checked before the output, so that a failed run still reports leftovers.
    alive = []
    for name, pid in pids.items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(f"{name} ({pid})")
    assert alive == [], f"daemons still running: {alive}\n{done.stdout}"

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert set(pids) == {"broker", "general-1", "general-2", "reserved-high"}
    assert re.search(
        r"^\s+id\s+priority\s+worker\s+waited\s+ran\s+state$",
        done.stdout,
        re.M,
    )
    rows = re.findall(
        r"^\s*\d+\*?\s+(high|normal|low)\s+(\S+)\s+[\d.]+\s+"
        r"[\d.]+\s+(\S+)$",
        done.stdout,
        re.M,
    )
    assert len(rows) == 27
    assert {state for _, _, state in rows} == {"succeeded"}
    # The late high tasks go to the worker kept free for them.
    late = re.findall(r"^\s*\d+\*\s+high\s+(\S+)", done.stdout, re.M)
    assert late == ["reserved-high"] * 4
    assert "What this shows:" in done.stdout
    assert re.search(
        r"^Watch it on the broker's dashboard: "
        r"http://127\.0\.0\.1:\d+/\?token=\S+$",
        done.stdout,
        re.M,
    )
    # Not on a terminal: it does not linger.
    assert "stays up" not in done.stdout
    for name in pids:
        assert (tmp_path / "demo-run" / f"{name}.log").exists()


def test_demo_failure_is_one_line(tmp_path):
    # A file where the folder should be: the demo cannot even start.
    (tmp_path / "demo-run").write_text("in the way")
    done = subprocess.run(
        [sys.executable, "-m", "taskbroker.demo", "--scale", "0.1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo: "), done.stderr
